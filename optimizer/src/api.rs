//! The HTTP API. `router(state)` builds it; serving it is the caller's business, so most tests
//! call it directly with `oneshot`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tuning::{BucketDecision, ConnectionContext, PartialSettings, Reason};

use crate::auth::{self, Caller, Role, Token};
use crate::config::Config;
use crate::state::{self, OverrideRow};

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The database.
    pub db: sqlx::PgPool,
    /// The decisions snapshot.
    pub state: Arc<state::State>,
    /// Resolved tokens.
    pub tokens: Arc<Vec<Token>>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// The optimizer's counters.
#[derive(Debug)]
pub struct Metrics {
    /// Decisions by reason (index of [`REASONS`]).
    pub decisions: [AtomicU64; 6],
    /// Time to decide one context (precedence, features, ONNX inference), seconds.
    pub decide_seconds: std::sync::Mutex<tuning::histogram::Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            decisions: Default::default(),
            decide_seconds: std::sync::Mutex::new(tuning::histogram::Histogram::new(
                tuning::histogram::LATENCY_SECONDS,
            )),
        }
    }
}

/// Reasons in metric order.
pub const REASONS: [Reason; 6] = [
    Reason::KillSwitch,
    Reason::Override,
    Reason::Canary,
    Reason::Model,
    Reason::Default,
    Reason::Fallback,
];

/// API errors, mapped to a status and a short reason; database details never leak.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No valid token.
    #[error("unauthorized")]
    Unauthorized,
    /// A valid token without the role.
    #[error("forbidden")]
    Forbidden,
    /// Input that does not validate; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Nothing with that id.
    #[error("not found")]
    NotFound,
    /// The database failed.
    #[error("database unavailable")]
    Database(#[from] sqlx::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Database(e) => {
                tracing::error!(error = %e, "database error");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let mut r = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("hv"));
        }
        r
    }
}

/// `Json` whose rejections are our 422 with the serde message (which names the field).
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::Invalid(e.body_text())),
            Err(e) => Err(ApiError::Invalid(e.body_text())),
        }
    }
}

fn require(s: &AppState, h: &HeaderMap, need: Role) -> Result<Caller, ApiError> {
    auth::check(&s.tokens, s.config.allow_unauthenticated, h, need).map_err(|d| match d {
        auth::Denied::Unauthenticated => ApiError::Unauthorized,
        auth::Denied::Forbidden => ApiError::Forbidden,
    })
}

/// Every route, for the router and the OpenAPI document alike.
pub const ROUTES: &[(&str, &str, &str)] = &[
    ("get", "/healthz", "Liveness."),
    ("get", "/readyz", "Readiness: PostgreSQL answers."),
    ("get", "/metrics", "Prometheus metrics."),
    ("get", "/openapi.json", "This document."),
    (
        "post",
        "/v1/decisions",
        "Decide for one ConnectionContext or a list (reader).",
    ),
    ("get", "/v1/overrides", "List overrides in force (reader)."),
    (
        "put",
        "/v1/overrides",
        "Create or replace the override of a scope (admin).",
    ),
    (
        "delete",
        "/v1/overrides/{id}",
        "Delete an override (admin).",
    ),
    ("get", "/v1/kill-switch", "Kill switch state (reader)."),
    (
        "post",
        "/v1/kill-switch",
        "Turn the kill switch on (admin).",
    ),
    (
        "delete",
        "/v1/kill-switch",
        "Turn the kill switch off (admin).",
    ),
    ("get", "/v1/audit", "The audit log, newest first (reader)."),
    ("get", "/v1/models", "The model registry (reader)."),
    (
        "get",
        "/v1/models/{version}",
        "One model's metadata and metrics (reader).",
    ),
    (
        "post",
        "/v1/models/{version}/activate",
        "Validate and activate a model: an audited force-promote (admin).",
    ),
    (
        "post",
        "/v1/models/rollback",
        "Activate the last-good model again (admin).",
    ),
];

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/decisions", post(decisions))
        .route("/v1/overrides", get(list_overrides))
        .route("/v1/overrides", put(put_override))
        .route("/v1/overrides/{id}", delete(delete_override))
        .route("/v1/kill-switch", get(get_kill_switch))
        .route("/v1/kill-switch", post(kill_switch_on))
        .route("/v1/kill-switch", delete(kill_switch_off))
        .route("/v1/audit", get(audit))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{version}", get(get_model))
        .route("/v1/models/{version}/activate", post(activate_model))
        .route("/v1/models/rollback", post(rollback_model))
        .route("/v1/rollouts", get(list_rollouts))
        .route("/v1/rollouts", post(start_rollout))
        .route("/v1/rollouts/{id}", get(get_rollout))
        .route("/v1/rollouts/{id}/{action}", post(rollout_action))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("select 1").execute(&s.db).await?;
    Ok("ready\n")
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    use std::fmt::Write as _;
    let snap = s.state.get();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP trimtab_optimizer_decisions_total Decisions served, by reason.\n# TYPE trimtab_optimizer_decisions_total counter"
    );
    for (i, r) in REASONS.iter().enumerate() {
        let _ = writeln!(
            out,
            "trimtab_optimizer_decisions_total{{reason=\"{}\"}} {}",
            r.as_str(),
            s.metrics.decisions[i].load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP trimtab_optimizer_overrides Overrides in force.\n# TYPE trimtab_optimizer_overrides gauge\ntrimtab_optimizer_overrides {}",
        snap.overrides.len()
    );
    let _ = writeln!(
        out,
        "# HELP trimtab_optimizer_kill_switch 1 when the kill switch is on.\n# TYPE trimtab_optimizer_kill_switch gauge\ntrimtab_optimizer_kill_switch {}",
        u8::from(snap.kill_switch)
    );
    let name = "trimtab_optimizer_decide_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to decide one context (precedence, features, ONNX inference).\n# TYPE {name} histogram"
    );
    let h = s
        .metrics
        .decide_seconds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    h.render(&mut out, name, "");
    let _ = writeln!(
        out,
        "# HELP trimtab_optimizer_active_model 1 for the model that decides (shipped or registry).\n# TYPE trimtab_optimizer_active_model gauge"
    );
    if let Some(m) = snap.model.as_ref().or(s.state.shipped.as_ref()) {
        let _ = writeln!(
            out,
            "trimtab_optimizer_active_model{{version=\"{}\"}} 1",
            tuning::histogram::label_value(&m.version)
        );
    }
    // Each family's samples right after its HELP and TYPE lines, as the text format wants.
    let rollout = snap.rollout.as_ref().map(|(r, _)| r);
    let _ = writeln!(
        out,
        "# HELP trimtab_optimizer_rollout_percent Canary share of the active rollout (0 without one).\n# TYPE trimtab_optimizer_rollout_percent gauge\ntrimtab_optimizer_rollout_percent {}",
        rollout.map_or(0.0, |r| r.percent())
    );
    let _ = writeln!(
        out,
        "# HELP trimtab_optimizer_rollout_step Step index of the active rollout.\n# TYPE trimtab_optimizer_rollout_step gauge\ntrimtab_optimizer_rollout_step {}",
        rollout.map_or(0, |r| r.step_index)
    );
    let _ = writeln!(
        out,
        "# HELP trimtab_optimizer_rollout_gate Last gate values of the active rollout, by cohort and gate.\n# TYPE trimtab_optimizer_rollout_gate gauge"
    );
    if let Some(g) = rollout.and_then(|r| r.last_gate.as_ref()) {
        for cohort in ["canary", "control"] {
            for (k, v) in g[cohort].as_object().into_iter().flatten() {
                if let Some(v) = v.as_f64() {
                    let _ = writeln!(
                        out,
                        "trimtab_optimizer_rollout_gate{{cohort=\"{cohort}\",gate=\"{}\"}} {v}",
                        tuning::histogram::label_value(k)
                    );
                }
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

async fn openapi() -> Json<serde_json::Value> {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in ROUTES {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        let mut op = json!({ "summary": summary, "responses": { "200": { "description": "OK" } } });
        if path.starts_with("/v1/") {
            op["security"] = json!([{ "bearer": [] }]);
            op["responses"]["401"] = json!({ "description": "no valid token" });
            op["responses"]["403"] = json!({ "description": "token lacks the role" });
        }
        if path.contains("{id}") {
            op["parameters"] = json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "integer" } }]);
        }
        if path.contains("{version}") {
            op["parameters"] = json!([{ "name": "version", "in": "path", "required": true, "schema": { "type": "string" } }]);
        }
        if *method == "put" || *method == "post" {
            op["responses"]["422"] =
                json!({ "description": "invalid input; the message names the field" });
        }
        entry[*method] = op;
    }
    Json(json!({
        "openapi": "3.1.0",
        "info": { "title": "trimtab optimizer", "version": env!("CARGO_PKG_VERSION") },
        "components": { "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } } },
        "paths": paths,
    }))
}

/// One context or a batch.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DecisionRequest {
    Batch(Vec<ConnectionContext>),
    One(Box<ConnectionContext>),
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum DecisionResponse {
    Batch(Vec<BucketDecision>),
    One(Box<BucketDecision>),
}

async fn decisions(
    State(s): State<AppState>,
    headers: HeaderMap,
    Body(req): Body<DecisionRequest>,
) -> Result<Json<DecisionResponse>, ApiError> {
    require(&s, &headers, Role::Reader)?;
    let snap = s.state.get();
    let decide = |c: &ConnectionContext| {
        let t0 = std::time::Instant::now();
        let d = state::decide(&s.config, &snap, c);
        s.metrics
            .decide_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(t0.elapsed().as_secs_f64());
        if let Some(i) = REASONS.iter().position(|r| *r == d.decision.reason) {
            s.metrics.decisions[i].fetch_add(1, Ordering::Relaxed);
        }
        d
    };
    Ok(Json(match req {
        DecisionRequest::One(c) => DecisionResponse::One(Box::new(decide(&c))),
        DecisionRequest::Batch(cs) => {
            if cs.len() > 1000 {
                return Err(ApiError::Invalid(
                    "a batch holds at most 1000 contexts".into(),
                ));
            }
            DecisionResponse::Batch(cs.iter().map(decide).collect())
        }
    }))
}

pub(crate) async fn audit_entry(
    db: &sqlx::PgPool,
    actor: &str,
    action: &str,
    target: &str,
    old: Option<serde_json::Value>,
    new: Option<serde_json::Value>,
    comment: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into audit_log (actor, action, target, old_value, new_value, comment) values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(old)
    .bind(new)
    .bind(comment)
    .execute(db)
    .await
    .map(|_| ())
}

/// A change made through the API or by the rollout controller.
pub(crate) struct Change<'a> {
    /// Who made it.
    pub actor: &'a str,
    /// What was done (`override.put`, `rollout.promoted`, …).
    pub action: &'a str,
    /// What it was done to.
    pub target: &'a str,
    /// The value before.
    pub old: Option<serde_json::Value>,
    /// The value after.
    pub new: Option<serde_json::Value>,
    /// Why.
    pub comment: &'a str,
    /// Which part of the state changed (the notification payload).
    pub topic: &'a str,
}

/// Record a change: the audit log, a notification to every replica, and this replica's
/// snapshot reloaded at once.
pub(crate) async fn record(s: &AppState, c: Change<'_>) -> Result<(), sqlx::Error> {
    audit_entry(&s.db, c.actor, c.action, c.target, c.old, c.new, c.comment).await?;
    state::notify(&s.db, c.topic).await?;
    let _ = s.state.reload(&s.db).await;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    service: Option<String>,
}

async fn list_overrides(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<OverrideRow>>, ApiError> {
    require(&s, &headers, Role::Reader)?;
    let rows: Vec<OverrideRow> = sqlx::query_as(
        "select id, service, route, client_key, settings, expires_at, comment, created_by, created_at, updated_at
           from overrides where (expires_at is null or expires_at > now()) and ($1::text is null or service = $1)
          order by service, id",
    )
    .bind(q.service)
    .fetch_all(&s.db)
    .await?;
    Ok(Json(rows))
}

/// A new override.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideInput {
    service: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    client_key: Option<String>,
    settings: PartialSettings,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    comment: String,
}

async fn put_override(
    State(s): State<AppState>,
    headers: HeaderMap,
    Body(input): Body<OverrideInput>,
) -> Result<(StatusCode, Json<OverrideRow>), ApiError> {
    let caller = require(&s, &headers, Role::Admin)?;
    if input.service.trim().is_empty() {
        return Err(ApiError::Invalid("service must not be empty".into()));
    }
    if input.settings.is_empty() {
        return Err(ApiError::Invalid(
            "settings must name at least one field".into(),
        ));
    }
    input
        .settings
        .validate()
        .map_err(|e| ApiError::Invalid(format!("settings.{e}")))?;
    // The override must also make sense on top of the service's static settings.
    let combined = s
        .config
        .static_settings(&input.service)
        .with(&input.settings);
    if let Err(e) = combined.validate() {
        return Err(ApiError::Invalid(format!("settings.{e}")));
    }
    if input.expires_at.is_some_and(|t| t <= Utc::now()) {
        return Err(ApiError::Invalid("expires_at is in the past".into()));
    }
    let mut tx = s.db.begin().await?;
    let old: Option<OverrideRow> = sqlx::query_as(
        "select id, service, route, client_key, settings, expires_at, comment, created_by, created_at, updated_at
           from overrides where service = $1 and coalesce(route, '') = coalesce($2, '') and coalesce(client_key, '') = coalesce($3, '')
           for update",
    )
    .bind(&input.service)
    .bind(&input.route)
    .bind(&input.client_key)
    .fetch_optional(&mut *tx)
    .await?;
    let row: OverrideRow = sqlx::query_as(
        "insert into overrides (service, route, client_key, settings, expires_at, comment, created_by)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (service, coalesce(route, ''), coalesce(client_key, ''))
         do update set settings = excluded.settings, expires_at = excluded.expires_at,
                       comment = excluded.comment, created_by = excluded.created_by, updated_at = now()
         returning id, service, route, client_key, settings, expires_at, comment, created_by, created_at, updated_at",
    )
    .bind(&input.service)
    .bind(&input.route)
    .bind(&input.client_key)
    .bind(sqlx::types::Json(&input.settings))
    .bind(input.expires_at)
    .bind(&input.comment)
    .bind(&caller.name)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    record(
        &s,
        Change {
            actor: &caller.name,
            action: "override.put",
            target: &format!("override/{}", row.id),
            old: old.as_ref().map(|o| json!(o)),
            new: Some(json!(row)),
            comment: &input.comment,
            topic: "overrides",
        },
    )
    .await?;
    let status = if old.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(row)))
}

#[derive(Debug, Deserialize, Default)]
struct CommentQuery {
    #[serde(default)]
    comment: Option<String>,
}

async fn delete_override(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<CommentQuery>,
) -> Result<StatusCode, ApiError> {
    let caller = require(&s, &headers, Role::Admin)?;
    let old: Option<OverrideRow> = sqlx::query_as(
        "delete from overrides where id = $1
         returning id, service, route, client_key, settings, expires_at, comment, created_by, created_at, updated_at",
    )
    .bind(id)
    .fetch_optional(&s.db)
    .await?;
    let old = old.ok_or(ApiError::NotFound)?;
    record(
        &s,
        Change {
            actor: &caller.name,
            action: "override.delete",
            target: &format!("override/{id}"),
            old: Some(json!(old)),
            new: None,
            comment: q.comment.as_deref().unwrap_or(""),
            topic: "overrides",
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct KillSwitch {
    enabled: bool,
    comment: String,
    set_by: Option<String>,
    set_at: Option<DateTime<Utc>>,
}

async fn get_kill_switch(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<KillSwitch>, ApiError> {
    require(&s, &headers, Role::Reader)?;
    let k: KillSwitch =
        sqlx::query_as("select enabled, comment, set_by, set_at from kill_switch where id")
            .fetch_one(&s.db)
            .await?;
    Ok(Json(k))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KillInput {
    #[serde(default)]
    comment: String,
}

async fn set_kill_switch(
    s: &AppState,
    caller: &Caller,
    enabled: bool,
    comment: &str,
) -> Result<Json<KillSwitch>, ApiError> {
    let old: KillSwitch =
        sqlx::query_as("select enabled, comment, set_by, set_at from kill_switch where id")
            .fetch_one(&s.db)
            .await?;
    let new: KillSwitch = sqlx::query_as(
        "update kill_switch set enabled = $1, comment = $2, set_by = $3, set_at = now() where id
         returning enabled, comment, set_by, set_at",
    )
    .bind(enabled)
    .bind(comment)
    .bind(&caller.name)
    .fetch_one(&s.db)
    .await?;
    record(
        s,
        Change {
            actor: &caller.name,
            action: if enabled {
                "kill_switch.on"
            } else {
                "kill_switch.off"
            },
            target: "kill_switch",
            old: Some(json!(old)),
            new: Some(json!(new)),
            comment,
            topic: "kill_switch",
        },
    )
    .await?;
    Ok(Json(new))
}

async fn kill_switch_on(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<KillSwitch>, ApiError> {
    let caller = require(&s, &headers, Role::Admin)?;
    let comment = if body.is_empty() {
        String::new()
    } else {
        serde_json::from_slice::<KillInput>(&body)
            .map_err(|e| ApiError::Invalid(e.to_string()))?
            .comment
    };
    set_kill_switch(&s, &caller, true, &comment).await
}

async fn kill_switch_off(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<CommentQuery>,
) -> Result<Json<KillSwitch>, ApiError> {
    let caller = require(&s, &headers, Role::Admin)?;
    set_kill_switch(&s, &caller, false, q.comment.as_deref().unwrap_or("")).await
}

/// A registry entry (without the ONNX bytes).
#[derive(Debug, Serialize, sqlx::FromRow)]
struct ModelRow {
    version: String,
    created_at: DateTime<Utc>,
    status: String,
    activated_at: Option<DateTime<Utc>>,
    size_bytes: i32,
    metadata: serde_json::Value,
    metrics: serde_json::Value,
}

const MODEL_COLUMNS: &str =
    "version, created_at, status, activated_at, length(onnx) as size_bytes, metadata, metrics";

async fn list_models(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&s, &headers, Role::Reader)?;
    let rows: Vec<ModelRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {MODEL_COLUMNS} from models order by created_at desc"
    )))
    .fetch_all(&s.db)
    .await?;
    let last_good: Option<String> =
        sqlx::query_scalar("select last_good_version from model_state where id")
            .fetch_optional(&s.db)
            .await?
            .flatten();
    Ok(Json(json!({ "models": rows, "last_good": last_good })))
}

async fn get_model(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(version): Path<String>,
) -> Result<Json<ModelRow>, ApiError> {
    require(&s, &headers, Role::Reader)?;
    let row: Option<ModelRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {MODEL_COLUMNS} from models where version = $1"
    )))
    .bind(&version)
    .fetch_optional(&s.db)
    .await?;
    row.map(Json).ok_or(ApiError::NotFound)
}

/// Make a rollout's candidate the active model (the controller's promotion).
pub(crate) async fn promote_candidate(
    s: &AppState,
    r: &crate::rollout::RolloutRow,
    actor: &str,
) -> Result<(), ApiError> {
    let caller = Caller {
        name: actor.to_string(),
        role: Role::Admin,
    };
    activate(
        s,
        &caller,
        &r.candidate_version,
        "model.activate",
        &format!("promoted by rollout {}", r.id),
    )
    .await
    .map(|_| ())
}

/// Make `version` the active model (validated first); the previous one becomes last-good.
async fn activate(
    s: &AppState,
    caller: &Caller,
    version: &str,
    action: &str,
    comment: &str,
) -> Result<Json<ModelRow>, ApiError> {
    let bytes: Option<Vec<u8>> = sqlx::query_scalar("select onnx from models where version = $1")
        .bind(version)
        .fetch_optional(&s.db)
        .await?;
    let bytes = bytes.ok_or(ApiError::NotFound)?;
    let rt = s
        .state
        .runtime
        .ok_or_else(|| ApiError::Invalid("ONNX Runtime is not available on this replica".into()))?;
    crate::models::LoadedModel::load(rt, version, &bytes)
        .map_err(|e| ApiError::Invalid(format!("model {version}: {e}")))?;
    let mut tx = s.db.begin().await?;
    let previous: Option<String> = sqlx::query_scalar(
        "update models set status = 'retired' where status = 'active' and version <> $1 returning version",
    )
    .bind(version)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query("update models set status = 'active', activated_at = now() where version = $1")
        .bind(version)
        .execute(&mut *tx)
        .await?;
    if action == "model.activate" {
        if let Some(p) = &previous {
            sqlx::query(
                "update model_state set last_good_version = $1, updated_at = now() where id",
            )
            .bind(p)
            .execute(&mut *tx)
            .await?;
        }
    } else {
        sqlx::query("update model_state set last_good_version = null, updated_at = now() where id")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    record(
        s,
        Change {
            actor: &caller.name,
            action,
            target: &format!("model/{version}"),
            old: Some(json!({ "active": previous })),
            new: Some(json!({ "active": version })),
            comment,
            topic: "models",
        },
    )
    .await?;
    let row: ModelRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {MODEL_COLUMNS} from models where version = $1"
    )))
    .bind(version)
    .fetch_one(&s.db)
    .await?;
    Ok(Json(row))
}

async fn activate_model(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(version): Path<String>,
    Query(q): Query<CommentQuery>,
) -> Result<Json<ModelRow>, ApiError> {
    let caller = require(&s, &headers, Role::Admin)?;
    activate(
        &s,
        &caller,
        &version,
        "model.activate",
        q.comment.as_deref().unwrap_or(""),
    )
    .await
}

async fn rollback_model(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<CommentQuery>,
) -> Result<Json<ModelRow>, ApiError> {
    let caller = require(&s, &headers, Role::Admin)?;
    let last_good: Option<String> =
        sqlx::query_scalar("select last_good_version from model_state where id")
            .fetch_optional(&s.db)
            .await?
            .flatten();
    let v = last_good
        .ok_or_else(|| ApiError::Invalid("there is no last-good model to roll back to".into()))?;
    activate(
        &s,
        &caller,
        &v,
        "model.rollback",
        q.comment.as_deref().unwrap_or(""),
    )
    .await
}

/// A new rollout.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutInput {
    candidate: String,
    #[serde(default = "default_steps")]
    steps: Vec<f32>,
    #[serde(default = "default_step_duration")]
    step_duration: String,
    #[serde(default = "default_min_connections")]
    min_connections: i32,
    #[serde(default)]
    shadow_share: f32,
    #[serde(default)]
    tolerances: crate::rollout::Tolerances,
    #[serde(default)]
    comment: String,
}

fn default_steps() -> Vec<f32> {
    vec![5.0, 25.0, 50.0, 100.0]
}
fn default_step_duration() -> String {
    "10m".into()
}
fn default_min_connections() -> i32 {
    200
}

async fn start_rollout(
    State(s): State<AppState>,
    headers: HeaderMap,
    Body(input): Body<RolloutInput>,
) -> Result<(StatusCode, Json<crate::rollout::RolloutRow>), ApiError> {
    let caller = require(&s, &headers, Role::Admin)?;
    if input.steps.is_empty()
        || input.steps.iter().any(|p| !(*p > 0.0 && *p <= 100.0))
        || input.steps.windows(2).any(|w| w[1] <= w[0])
        || input.steps.last() != Some(&100.0)
    {
        return Err(ApiError::Invalid(format!(
            "steps = {:?} must rise strictly within (0, 100] and end at 100",
            input.steps
        )));
    }
    let secs = tuning::settings::parse_secs(&input.step_duration)
        .filter(|s| *s > 0)
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "step_duration = {:?} is not a duration (e.g. \"10m\")",
                input.step_duration
            ))
        })?;
    if input.min_connections < 1 {
        return Err(ApiError::Invalid(format!(
            "min_connections = {} must be at least 1",
            input.min_connections
        )));
    }
    if !(0.0..=1.0).contains(&input.shadow_share) {
        return Err(ApiError::Invalid(format!(
            "shadow_share = {} must be between 0 and 1",
            input.shadow_share
        )));
    }
    let bytes: Option<Vec<u8>> = sqlx::query_scalar("select onnx from models where version = $1")
        .bind(&input.candidate)
        .fetch_optional(&s.db)
        .await?;
    let bytes = bytes.ok_or_else(|| {
        ApiError::Invalid(format!(
            "candidate {:?} is not in the registry",
            input.candidate
        ))
    })?;
    let rt = s
        .state
        .runtime
        .ok_or_else(|| ApiError::Invalid("ONNX Runtime is not available on this replica".into()))?;
    crate::models::LoadedModel::load(rt, &input.candidate, &bytes)
        .map_err(|e| ApiError::Invalid(format!("candidate {}: {e}", input.candidate)))?;
    let control: Option<String> =
        sqlx::query_scalar("select version from models where status = 'active'")
            .fetch_optional(&s.db)
            .await?;
    if control.as_deref() == Some(input.candidate.as_str()) {
        return Err(ApiError::Invalid(format!(
            "{} is already the active model",
            input.candidate
        )));
    }
    let mut tx = s.db.begin().await?;
    // A newer candidate restarts the analysis: the running rollout is superseded.
    let superseded: Option<i64> = sqlx::query_scalar(
        "update rollouts set state = 'aborted', state_reason = 'superseded by a newer candidate', updated_at = now()
          where state in ('shadow', 'canary', 'paused') returning id",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let salt = tuning::hash::stable_hash(&[
        input.candidate.as_bytes(),
        Utc::now().to_rfc3339().as_bytes(),
    ]) as i64;
    let state = if input.shadow_share > 0.0 {
        "shadow"
    } else {
        "canary"
    };
    let row: crate::rollout::RolloutRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into rollouts (candidate_version, control_version, salt, steps, shadow_share, step_duration_s,
                               min_connections, tolerances, state, created_by)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) returning {}",
        crate::rollout::COLUMNS
    )))
    .bind(&input.candidate)
    .bind(&control)
    .bind(salt)
    .bind(&input.steps)
    .bind(input.shadow_share)
    .bind(secs as i32)
    .bind(input.min_connections)
    .bind(sqlx::types::Json(input.tolerances))
    .bind(state)
    .bind(&caller.name)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    record(
        &s,
        Change {
            actor: &caller.name,
            action: "rollout.start",
            target: &format!("rollout/{}", row.id),
            old: superseded.map(|id| json!({ "superseded": id })),
            new: Some(json!(row)),
            comment: &input.comment,
            topic: "rollouts",
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(row)))
}

async fn list_rollouts(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<crate::rollout::RolloutRow>>, ApiError> {
    require(&s, &headers, Role::Reader)?;
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {} from rollouts order by id desc limit 100",
        crate::rollout::COLUMNS
    )))
    .fetch_all(&s.db)
    .await?;
    Ok(Json(rows))
}

async fn get_rollout(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<crate::rollout::RolloutRow>, ApiError> {
    require(&s, &headers, Role::Reader)?;
    let row: Option<crate::rollout::RolloutRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {} from rollouts where id = $1",
        crate::rollout::COLUMNS
    )))
    .bind(id)
    .fetch_optional(&s.db)
    .await?;
    row.map(Json).ok_or(ApiError::NotFound)
}

async fn rollout_action(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, action)): Path<(i64, String)>,
    Query(q): Query<CommentQuery>,
) -> Result<Json<crate::rollout::RolloutRow>, ApiError> {
    let caller = require(&s, &headers, Role::Admin)?;
    let Json(r) = get_rollout(State(s.clone()), headers.clone(), Path(id)).await?;
    let (from_ok, to): (&[&str], &str) = match action.as_str() {
        "pause" => (&["shadow", "canary"], "paused"),
        "resume" => (&["paused"], "canary"),
        "promote" => (&["shadow", "canary", "paused"], "promoted"),
        "abort" => (&["shadow", "canary", "paused"], "aborted"),
        _ => return Err(ApiError::NotFound),
    };
    if !from_ok.contains(&r.state.as_str()) {
        return Err(ApiError::Invalid(format!(
            "cannot {action} a rollout that is {}",
            r.state
        )));
    }
    if to == "promoted" {
        promote_candidate(&s, &r, &caller.name).await?;
    }
    let reason = format!("{action} by {}", caller.name);
    sqlx::query(
        "update rollouts set state = $2, state_reason = $3, updated_at = now(),
                step_started_at = case when $2 = 'canary' then now() else step_started_at end
          where id = $1",
    )
    .bind(id)
    .bind(to)
    .bind(&reason)
    .execute(&s.db)
    .await?;
    record(
        &s,
        Change {
            actor: &caller.name,
            action: &format!("rollout.{action}"),
            target: &format!("rollout/{id}"),
            old: Some(json!({ "state": r.state })),
            new: Some(json!({ "state": to })),
            comment: q.comment.as_deref().unwrap_or(""),
            topic: "rollouts",
        },
    )
    .await?;
    let Json(r) = get_rollout(State(s.clone()), headers, Path(id)).await?;
    Ok(Json(r))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct AuditRow {
    id: i64,
    at: DateTime<Utc>,
    actor: String,
    action: String,
    target: String,
    old_value: Option<serde_json::Value>,
    new_value: Option<serde_json::Value>,
    comment: String,
}

async fn audit(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditRow>>, ApiError> {
    require(&s, &headers, Role::Reader)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows: Vec<AuditRow> = sqlx::query_as(
        "select id, at, actor, action, target, old_value, new_value, comment from audit_log order by id desc limit $1",
    )
    .bind(limit)
    .fetch_all(&s.db)
    .await?;
    Ok(Json(rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body as AxBody;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const CONFIG: &str = r#"
[services.chat]
mode = "frame_aware"
[[tokens]]
name = "ops"
role = "admin"
token = "admin-token-1"
[[tokens]]
name = "dp"
role = "reader"
token = "reader-token-1"
"#;

    async fn app(db: sqlx::PgPool) -> AppState {
        crate::app_state(Config::from_toml(CONFIG).unwrap(), db)
            .await
            .unwrap()
    }

    async fn call(
        s: &AppState,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(AxBody::from(v.to_string()))
                .unwrap(),
            None => b.body(AxBody::empty()).unwrap(),
        };
        let resp = router(s.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
        (status, v)
    }

    fn ctx(client: Option<&str>) -> serde_json::Value {
        json!({"service": "chat", "route": "/ws", "protocol": "websocket", "client_class": "browser",
               "client_region": "eu", "hour_of_week": 5, "client_key": client})
    }

    const A: Option<&str> = Some("admin-token-1");
    const R: Option<&str> = Some("reader-token-1");

    #[sqlx::test(migrations = "../migrations")]
    async fn tokens_and_roles_are_enforced(db: sqlx::PgPool) {
        let s = app(db).await;
        let (st, _) = call(&s, "POST", "/v1/decisions", None, Some(ctx(None))).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _) = call(
            &s,
            "POST",
            "/v1/decisions",
            Some("wrong-token-x"),
            Some(ctx(None)),
        )
        .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, body) = call(&s, "POST", "/v1/kill-switch", R, None).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert_eq!(body, json!({"error": "forbidden"}));
        let (st, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(d["decision"]["reason"], "default");
        assert_eq!(d["decision"]["settings"]["mode"], "frame_aware");
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn overrides_apply_validate_expire_and_are_audited(db: sqlx::PgPool) {
        let s = app(db).await;
        // invalid input names the field and the value
        let (st, e) = call(
            &s,
            "PUT",
            "/v1/overrides",
            A,
            Some(json!({"service": "chat", "settings": {"buffer_size": 1000}})),
        )
        .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            e["error"].as_str().unwrap().contains("buffer_size = 1000"),
            "{e}"
        );
        let (st, e) = call(
            &s,
            "PUT",
            "/v1/overrides",
            A,
            Some(json!({"service": "chat", "settings": {"bufer_size": 4096}})),
        )
        .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e["error"].as_str().unwrap().contains("bufer_size"), "{e}");
        let (st, e) = call(
            &s,
            "PUT",
            "/v1/overrides",
            A,
            Some(json!({"service": "echo", "settings": {"compression": true}})),
        )
        .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        assert!(e["error"].as_str().unwrap().contains("compression"), "{e}");
        // a service override, then a client override on top
        let (st, o) = call(&s, "PUT", "/v1/overrides", A,
            Some(json!({"service": "chat", "settings": {"idle_timeout": "15m"}, "comment": "long sessions"}))).await;
        assert_eq!(st, StatusCode::CREATED, "{o}");
        let (st, _) = call(&s, "PUT", "/v1/overrides", A,
            Some(json!({"service": "chat", "client_key": "vip", "settings": {"buffer_size": "64KiB"}}))).await;
        assert_eq!(st, StatusCode::CREATED);
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["decision"]["reason"], "override");
        assert_eq!(d["decision"]["settings"]["idle_timeout"], 900);
        assert_eq!(d["client_overrides"][0]["client_key"], "vip");
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(Some("vip")))).await;
        assert_eq!(d["decision"]["settings"]["buffer_size"], 65536);
        assert_eq!(d["decision"]["settings"]["idle_timeout"], 900);
        // replacing the same scope answers 200 and keeps one row
        let (st, o2) = call(
            &s,
            "PUT",
            "/v1/overrides",
            A,
            Some(json!({"service": "chat", "settings": {"idle_timeout": "5m"}})),
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(o2["id"], o["id"]);
        let (_, list) = call(&s, "GET", "/v1/overrides", R, None).await;
        assert_eq!(list.as_array().unwrap().len(), 2);
        // delete, and the decision is back to default
        let id = o["id"].as_i64().unwrap();
        let (st, _) = call(&s, "DELETE", &format!("/v1/overrides/{id}"), A, None).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let (st, _) = call(&s, "DELETE", &format!("/v1/overrides/{id}"), A, None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["decision"]["reason"], "default");
        // an override that expired no longer applies
        sqlx::query("insert into overrides (service, settings, expires_at, created_by) values ('chat', '{\"idle_timeout\": 30}', now() - interval '1 second', 'ops')")
            .execute(&s.db).await.unwrap();
        s.state.reload(&s.db).await.unwrap();
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["decision"]["settings"]["idle_timeout"], 300);
        // the audit log has every change, with actor and old -> new
        let (_, log) = call(&s, "GET", "/v1/audit", R, None).await;
        let log = log.as_array().unwrap();
        assert_eq!(log.len(), 4, "{log:?}");
        assert_eq!(log[0]["action"], "override.delete");
        assert_eq!(log[1]["action"], "override.put");
        assert_eq!(log[1]["actor"], "ops");
        assert_eq!(log[1]["old_value"]["settings"]["idle_timeout"], 900);
        assert_eq!(log[1]["new_value"]["settings"]["idle_timeout"], 300);
        assert_eq!(log[3]["comment"], "long sessions");
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn the_kill_switch_beats_everything(db: sqlx::PgPool) {
        let s = app(db).await;
        call(
            &s,
            "PUT",
            "/v1/overrides",
            A,
            Some(json!({"service": "chat", "settings": {"idle_timeout": 60}})),
        )
        .await;
        let (st, k) = call(
            &s,
            "POST",
            "/v1/kill-switch",
            A,
            Some(json!({"comment": "incident 42"})),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{k}");
        assert_eq!(k["enabled"], true);
        let (_, d) = call(
            &s,
            "POST",
            "/v1/decisions",
            R,
            Some(json!([ctx(None), ctx(Some("x"))])),
        )
        .await;
        for one in d.as_array().unwrap() {
            assert_eq!(one["decision"]["reason"], "kill_switch");
            assert_eq!(one["decision"]["settings"]["idle_timeout"], 300);
        }
        let (_, k) = call(&s, "DELETE", "/v1/kill-switch", A, None).await;
        assert_eq!(k["enabled"], false);
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["decision"]["reason"], "override");
        let (_, m) = call(&s, "GET", "/metrics", None, None).await;
        assert!(
            m.as_str()
                .unwrap()
                .contains("trimtab_optimizer_decisions_total{reason=\"kill_switch\"} 2"),
            "{m}"
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_change_reaches_another_replica_within_a_second(db: sqlx::PgPool) {
        let a = app(db.clone()).await;
        let b = app(db).await;
        let t = std::time::Instant::now();
        call(&a, "POST", "/v1/kill-switch", A, None).await;
        loop {
            let (_, d) = call(&b, "POST", "/v1/decisions", R, Some(ctx(None))).await;
            if d["decision"]["reason"] == "kill_switch" {
                break;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_millis(2000),
                "replica b did not see the change"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn register(db: &sqlx::PgPool, version: &str, onnx: Vec<u8>) {
        sqlx::query("insert into models (version, onnx, metadata) values ($1, $2, $3)")
            .bind(version)
            .bind(onnx)
            .bind(json!({"schema_hash": tuning::schema_hash()}))
            .execute(db)
            .await
            .unwrap();
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn an_activated_model_decides_and_rolls_back_one_step(db: sqlx::PgPool) {
        let s = app(db.clone()).await;
        register(&db, "rule-1", crate::models::tests::rule_model()).await;
        register(
            &db,
            "const-2",
            tuning::onnx::export(&[], &tuning::Settings::default(), "const-2"),
        )
        .await;
        register(&db, "broken", b"not a model".to_vec()).await;
        // a broken model is refused with the reason, and nothing changes
        let (st, e) = call(&s, "POST", "/v1/models/broken/activate", A, None).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .starts_with("model broken: model rejected"),
            "{e}"
        );
        let (st, _) = call(&s, "POST", "/v1/models/nope/activate", A, None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = call(&s, "POST", "/v1/models/rule-1/activate", R, None).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        // activate: decisions come from the model, with exploration for the data plane
        let (st, m) = call(&s, "POST", "/v1/models/rule-1/activate", A, None).await;
        assert_eq!(st, StatusCode::OK, "{m}");
        assert_eq!(m["status"], "active");
        let mut c = ctx(None);
        c["offers_deflate"] = json!(true);
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(c.clone())).await;
        assert_eq!(d["decision"]["reason"], "model", "{d}");
        assert_eq!(d["decision"]["model_version"], "rule-1");
        assert_eq!(d["decision"]["settings"]["compression"], true);
        assert_eq!(d["decision"]["settings"]["buffer_size"], 65536);
        assert!((d["decision"]["propensity"].as_f64().unwrap() - 0.95).abs() < 1e-6);
        assert_eq!(d["exploration"]["share"], 0.05);
        // an override still beats the model
        call(
            &s,
            "PUT",
            "/v1/overrides",
            A,
            Some(json!({"service": "chat", "settings": {"buffer_size": 4096}})),
        )
        .await;
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(c.clone())).await;
        assert_eq!(d["decision"]["reason"], "override");
        assert_eq!(d["decision"]["settings"]["buffer_size"], 4096);
        assert_eq!(
            d["decision"]["settings"]["compression"], true,
            "the model's other fields stay"
        );
        assert!(d.get("exploration").is_none());
        // a second activation makes the first the last-good; rollback returns to it once
        let (_, _) = call(&s, "POST", "/v1/models/const-2/activate", A, None).await;
        let (_, list) = call(&s, "GET", "/v1/models", R, None).await;
        assert_eq!(list["last_good"], "rule-1");
        let (st, m) = call(&s, "POST", "/v1/models/rollback", A, None).await;
        assert_eq!(st, StatusCode::OK, "{m}");
        assert_eq!(m["version"], "rule-1");
        let (st, _) = call(&s, "POST", "/v1/models/rollback", A, None).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "one step only");
        let (_, one) = call(&s, "GET", "/v1/models/const-2", R, None).await;
        assert_eq!(one["status"], "retired");
        let (_, log) = call(&s, "GET", "/v1/audit", R, None).await;
        let actions: Vec<&str> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions[0], "model.rollback");
        assert!(actions.contains(&"model.activate"));
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn the_shipped_model_decides_until_the_registry_has_one(db: sqlx::PgPool) {
        let dir = std::env::temp_dir().join(format!("trimtab-shipped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("default.onnx");
        std::fs::write(&path, crate::models::tests::rule_model()).unwrap();
        let cfg = format!("shipped_model = {:?}\n{CONFIG}", path.display().to_string());
        let s = crate::app_state(Config::from_toml(&cfg).unwrap(), db.clone())
            .await
            .unwrap();
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["decision"]["reason"], "model", "{d}");
        assert_eq!(d["decision"]["model_version"], "shipped:default");
        register(
            &db,
            "const-2",
            tuning::onnx::export(&[], &tuning::Settings::default(), "const-2"),
        )
        .await;
        call(&s, "POST", "/v1/models/const-2/activate", A, None).await;
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["decision"]["model_version"], "const-2");
        // a shipped model that is not a model: static defaults, and the reason says so
        std::fs::write(&path, b"garbage").unwrap();
        let s2 = crate::app_state(
            Config::from_toml(&cfg).unwrap(),
            sqlx::PgPool::connect_lazy_with(db.connect_options().as_ref().clone()),
        )
        .await
        .unwrap();
        sqlx::query("update models set status = 'retired'")
            .execute(&db)
            .await
            .unwrap();
        s2.state.reload(&db).await.unwrap();
        let (_, d) = call(&s2, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["decision"]["reason"], "default", "{d}");
    }

    /// Profiles as the data plane writes them, for the gates.
    async fn profiles(db: &sqlx::PgPool, cohort: &str, n: usize, idle_fired: bool) {
        for _ in 0..n {
            sqlx::query(
                "insert into profiles (connection_id, dataplane_id, started_at, ended_at, duration_us, service, route,
                   protocol, offers_deflate, client_class, client_region, hour_of_week, buffer_size, ping_interval_s,
                   idle_timeout_s, compression, mode, reason, cohort, propensity, c2u_msg_size_hist, c2u_read_size_hist,
                   c2u_gap_ms_hist, u2c_msg_size_hist, u2c_read_size_hist, u2c_gap_ms_hist, closed_by, idle_timeout_fired,
                   u2c_first_message_us)
                 values (gen_random_uuid(), 't', now(), now(), 1000, 'chat', '/ws', 'websocket', false, 'other', 'eu', 0,
                   16384, 30, 300, false, 'zero_copy', 'default', $1, 1, '{}', '{}', '{}', '{}', '{}', '{}', 'client', $2, 500)",
            )
            .bind(cohort)
            .bind(idle_fired)
            .execute(db)
            .await
            .unwrap();
        }
    }

    async fn age_step(db: &sqlx::PgPool) {
        // 1.5 step durations into the step: due for judging, not yet inconclusive.
        sqlx::query("update rollouts set step_started_at = now() - interval '1500 milliseconds'")
            .execute(db)
            .await
            .unwrap();
        sqlx::query("update profiles set started_at = now() - interval '1 second'")
            .execute(db)
            .await
            .unwrap();
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn rollouts_split_cohorts_and_are_judged_by_their_gates(db: sqlx::PgPool) {
        let s = app(db.clone()).await;
        register(
            &db,
            "good",
            tuning::onnx::export(&[], &tuning::Settings::default(), "good"),
        )
        .await;
        let bad_settings = tuning::Settings {
            idle_timeout: 30,
            ..tuning::Settings::default()
        };
        register(&db, "bad", tuning::onnx::export(&[], &bad_settings, "bad")).await;
        // validation names the field
        let (st, e) = call(
            &s,
            "POST",
            "/v1/rollouts",
            A,
            Some(json!({"candidate": "good", "steps": [50, 25, 100]})),
        )
        .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .starts_with("steps = [50.0, 25.0, 100.0]"),
            "{e}"
        );
        let (st, e) = call(
            &s,
            "POST",
            "/v1/rollouts",
            A,
            Some(json!({"candidate": "nope"})),
        )
        .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        // a bad candidate: the canary closes prematurely, the controller rolls it back
        let (st, r) = call(&s, "POST", "/v1/rollouts", A,
            Some(json!({"candidate": "bad", "steps": [50, 100], "step_duration": "1s", "min_connections": 5}))).await;
        assert_eq!(st, StatusCode::CREATED, "{r}");
        assert_eq!(r["state"], "canary");
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["rollout"]["percent"], 50.0, "{d}");
        assert_eq!(d["rollout"]["candidate"]["settings"]["idle_timeout"], 30);
        assert_eq!(d["rollout"]["candidate"]["model_version"], "bad");
        profiles(&db, "canary", 3, true).await;
        profiles(&db, "control", 10, false).await;
        age_step(&db).await;
        assert_eq!(
            crate::rollout::tick(&s).await.unwrap(),
            None,
            "too few canary connections: wait"
        );
        profiles(&db, "canary", 5, true).await;
        sqlx::query("update profiles set started_at = now() - interval '1 second'")
            .execute(&db)
            .await
            .unwrap();
        assert_eq!(
            crate::rollout::tick(&s).await.unwrap().as_deref(),
            Some("rolled_back")
        );
        let (_, r) = call(&s, "GET", &format!("/v1/rollouts/{}", r["id"]), R, None).await;
        assert_eq!(r["state"], "rolled_back");
        assert!(
            r["state_reason"].as_str().unwrap().contains("replay_cost"),
            "{r}"
        );
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert!(d.get("rollout").is_none(), "no split after a rollback: {d}");
        // a good candidate passes every step and is promoted
        sqlx::query("delete from profiles")
            .execute(&db)
            .await
            .unwrap();
        let (_, r) = call(&s, "POST", "/v1/rollouts", A,
            Some(json!({"candidate": "good", "steps": [25, 50, 100], "step_duration": "1s", "min_connections": 5}))).await;
        for expect in ["step 1", "promoted"] {
            profiles(&db, "canary", 6, false).await;
            profiles(&db, "control", 6, false).await;
            age_step(&db).await;
            assert_eq!(
                crate::rollout::tick(&s).await.unwrap().as_deref(),
                Some(expect)
            );
        }
        let (_, m) = call(&s, "GET", "/v1/models/good", R, None).await;
        assert_eq!(m["status"], "active");
        let (_, r) = call(&s, "GET", &format!("/v1/rollouts/{}", r["id"]), R, None).await;
        assert_eq!(r["state"], "promoted");
        let (_, log) = call(&s, "GET", "/v1/audit", R, None).await;
        let actions: Vec<&str> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert!(
            actions.contains(&"rollout.promoted") && actions.contains(&"rollout.rolled_back"),
            "{actions:?}"
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn rollouts_pause_resume_abort_and_a_newer_candidate_supersedes(db: sqlx::PgPool) {
        let s = app(db.clone()).await;
        register(
            &db,
            "c1",
            tuning::onnx::export(&[], &tuning::Settings::default(), "c1"),
        )
        .await;
        register(
            &db,
            "c2",
            tuning::onnx::export(&[], &tuning::Settings::default(), "c2"),
        )
        .await;
        let (_, r1) = call(
            &s,
            "POST",
            "/v1/rollouts",
            A,
            Some(json!({"candidate": "c1", "shadow_share": 0.5})),
        )
        .await;
        assert_eq!(r1["state"], "shadow");
        let (_, d) = call(&s, "POST", "/v1/decisions", R, Some(ctx(None))).await;
        assert_eq!(d["rollout"]["percent"], 0.0);
        assert_eq!(d["rollout"]["shadow_share"], 0.5);
        let id = r1["id"].as_i64().unwrap();
        let (st, r) = call(&s, "POST", &format!("/v1/rollouts/{id}/pause"), A, None).await;
        assert_eq!((st, r["state"].as_str()), (StatusCode::OK, Some("paused")));
        let (st, _) = call(&s, "POST", &format!("/v1/rollouts/{id}/pause"), A, None).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        let (_, r) = call(&s, "POST", &format!("/v1/rollouts/{id}/resume"), A, None).await;
        assert_eq!(r["state"], "canary");
        let (st, _) = call(&s, "POST", &format!("/v1/rollouts/{id}/resume"), R, None).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        // a newer candidate restarts the analysis
        let (_, r2) = call(
            &s,
            "POST",
            "/v1/rollouts",
            A,
            Some(json!({"candidate": "c2"})),
        )
        .await;
        let (_, old) = call(&s, "GET", &format!("/v1/rollouts/{id}"), R, None).await;
        assert_eq!(old["state"], "aborted");
        assert_eq!(old["state_reason"], "superseded by a newer candidate");
        let id2 = r2["id"].as_i64().unwrap();
        let (_, r) = call(&s, "POST", &format!("/v1/rollouts/{id2}/abort"), A, None).await;
        assert_eq!(r["state"], "aborted");
        let (_, m) = call(&s, "GET", "/v1/models/c2", R, None).await;
        assert_eq!(m["status"], "candidate", "aborting never activates");
        let (_, r3) = call(
            &s,
            "POST",
            "/v1/rollouts",
            A,
            Some(json!({"candidate": "c2"})),
        )
        .await;
        let (_, r) = call(
            &s,
            "POST",
            &format!("/v1/rollouts/{}/promote", r3["id"]),
            A,
            None,
        )
        .await;
        assert_eq!(r["state"], "promoted");
        let (_, m) = call(&s, "GET", "/v1/models/c2", R, None).await;
        assert_eq!(m["status"], "active");
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn openapi_lists_exactly_the_routes_that_answer(db: sqlx::PgPool) {
        let s = app(db).await;
        let (_, doc) = call(&s, "GET", "/openapi.json", None, None).await;
        let paths = doc["paths"].as_object().unwrap();
        let mut n = 0;
        for (method, path, _) in ROUTES {
            assert!(paths[*path][*method].is_object(), "{method} {path} missing");
            let uri = path.replace("{id}", "999999").replace("{version}", "none");
            let (st, _) = call(&s, &method.to_uppercase(), &uri, A, None).await;
            assert_ne!(st, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            n += 1;
        }
        let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(documented, n);
        let (st, _) = call(&s, "GET", "/v1/nope", A, None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
}
