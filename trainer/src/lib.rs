//! `trainer`: reads profiles from PostgreSQL and (in later work) labels, fits, evaluates and
//! exports models. What exists today: reading and summarising a window of profiles, with clear
//! refusals for an unmigrated database or an empty window.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why the trainer refused to go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The `profiles` table is missing.
    #[error(
        "the database has no `profiles` table: run the migrations first (start the optimizer or `./dev up`)"
    )]
    Unmigrated,
    /// No profiles in the window.
    #[error("no profiles between {since} and {until}{}", service.as_ref().map(|s| format!(" for service {s:?}")).unwrap_or_default())]
    EmptyWindow {
        /// Window start.
        since: DateTime<Utc>,
        /// Window end.
        until: DateTime<Utc>,
        /// Service filter.
        service: Option<String>,
    },
    /// The window is backwards.
    #[error("--since {since} is not before --until {until}")]
    BadWindow {
        /// Window start.
        since: DateTime<Utc>,
        /// Window end.
        until: DateTime<Utc>,
    },
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Profile counts of one service in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceSummary {
    /// The service.
    pub service: String,
    /// Connections profiled.
    pub connections: i64,
    /// Connections per decision reason.
    pub by_reason: serde_json::Value,
}

/// Summarise the profiles of a window, per service.
pub async fn summarize(
    db: &sqlx::PgPool,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    service: Option<&str>,
) -> Result<Vec<ServiceSummary>, TrainerError> {
    if since >= until {
        return Err(TrainerError::BadWindow { since, until });
    }
    let exists: Option<String> = sqlx::query_scalar("select to_regclass('public.profiles')::text")
        .fetch_one(db)
        .await?;
    if exists.is_none() {
        return Err(TrainerError::Unmigrated);
    }
    let rows: Vec<(String, i64, serde_json::Value)> = sqlx::query_as(
        "select service, sum(n)::bigint, jsonb_object_agg(reason, n)
           from (select service, reason, count(*) as n from profiles
                  where started_at >= $1 and started_at < $2 and ($3::text is null or service = $3)
                  group by service, reason) t
          group by service order by service",
    )
    .bind(since)
    .bind(until)
    .bind(service)
    .fetch_all(db)
    .await?;
    if rows.is_empty() {
        return Err(TrainerError::EmptyWindow {
            since,
            until,
            service: service.map(str::to_owned),
        });
    }
    Ok(rows
        .into_iter()
        .map(|(service, connections, by_reason)| ServiceSummary {
            service,
            connections,
            by_reason,
        })
        .collect())
}
