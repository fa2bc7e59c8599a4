//! The HTTP API. `router(state)` builds it; serving it is the caller's business, so tests call
//! it directly with `oneshot`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tuning::{ConnectionContext, Decision, Reason};

use crate::config::Config;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The database.
    pub db: sqlx::PgPool,
}

/// API errors, mapped to a status and a short reason; database details never leak.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The database failed.
    #[error("database unavailable")]
    Database(#[from] sqlx::Error),
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Database(e) => {
                tracing::error!(error = %e, "database error");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/decisions", post(decisions))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("select 1").execute(&s.db).await?;
    Ok("ready\n")
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
    Batch(Vec<Decision>),
    One(Decision),
}

async fn decisions(
    State(s): State<AppState>,
    Json(req): Json<DecisionRequest>,
) -> Json<DecisionResponse> {
    let decide = |c: &ConnectionContext| {
        Decision::fixed(s.config.static_settings(&c.service), Reason::Default)
    };
    Json(match req {
        DecisionRequest::One(c) => DecisionResponse::One(decide(&c)),
        DecisionRequest::Batch(cs) => DecisionResponse::Batch(cs.iter().map(decide).collect()),
    })
}
