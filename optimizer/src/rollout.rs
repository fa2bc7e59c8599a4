//! Gradual rollout of a candidate model: shadow, sticky canary steps, metric gates, automatic
//! rollback — in the spirit of Flagger and Argo Rollouts.
//!
//! The state lives in the `rollouts` table, so the controller survives restarts; the controller
//! runs in exactly one optimizer replica at a time (a PostgreSQL advisory lock held on its own
//! connection). Every step compares the canary cohort with the control cohort over the profiles
//! of that step:
//! - abnormal close rate: close codes 1006/1011 or an error class;
//! - dead-peer rate: peers declared dead (false positives show up as a higher rate);
//! - p99 first-message latency (upstream → client), milliseconds;
//! - replay cost: the mean of `tuning::cost::replay_cost` of each connection under the settings
//!   it ran with, in CPU-microsecond equivalents — the same cost model the trainer's labels use.
//!
//! Not worse than control beyond the tolerances, with at least `min_connections` in each cohort
//! → next step (passing the step before 100 % promotes: the candidate becomes the active model,
//! since at 100 % there would be no control left to compare with); worse → rolled
//! back (the candidate stops; the active model never changed); too little data after three step
//! durations → paused as inconclusive.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Gate tolerances: how much worse than control the canary may be.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerances {
    /// Absolute increase of the abnormal close rate (0–1).
    #[serde(default = "d_rate")]
    pub abnormal_close_rate: f64,
    /// Absolute increase of the dead-peer rate (0–1).
    #[serde(default = "d_rate")]
    pub dead_peer_rate: f64,
    /// Increase of p99 first-message latency, milliseconds.
    #[serde(default = "d_latency")]
    pub p99_first_message_ms: f64,
    /// Increase of the mean replay cost per connection (`tuning::cost` units).
    #[serde(default = "d_cost")]
    pub replay_cost: f64,
}

fn d_rate() -> f64 {
    0.02
}
fn d_latency() -> f64 {
    50.0
}
fn d_cost() -> f64 {
    // CPU-µs equivalents per connection (a premature close alone costs 200 000)
    1000.0
}

impl Default for Tolerances {
    fn default() -> Self {
        Tolerances {
            abnormal_close_rate: d_rate(),
            dead_peer_rate: d_rate(),
            p99_first_message_ms: d_latency(),
            replay_cost: d_cost(),
        }
    }
}

/// One rollout row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RolloutRow {
    /// Id.
    pub id: i64,
    /// The candidate model.
    pub candidate_version: String,
    /// The model in control when it started (none: static defaults).
    pub control_version: Option<String>,
    /// Cohort hash salt.
    pub salt: i64,
    /// Canary percentages, in order.
    pub steps: Vec<f32>,
    /// Current step.
    pub step_index: i32,
    /// Share of connections shadowed.
    pub shadow_share: f32,
    /// Seconds per step (and of the shadow phase).
    pub step_duration_s: i32,
    /// Connections needed in each cohort before a step is judged.
    pub min_connections: i32,
    /// Gate tolerances.
    #[sqlx(json)]
    pub tolerances: Tolerances,
    /// shadow, canary, paused, promoted, rolled_back, aborted.
    pub state: String,
    /// Why it is in that state.
    pub state_reason: String,
    /// When the current step (or phase) began.
    pub step_started_at: DateTime<Utc>,
    /// The last gate evaluation.
    pub last_gate: Option<serde_json::Value>,
    /// Who started it.
    pub created_by: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Columns of [`RolloutRow`].
pub const COLUMNS: &str = "id, candidate_version, control_version, salt, steps, step_index, shadow_share, \
    step_duration_s, min_connections, tolerances, state, state_reason, step_started_at, last_gate, \
    created_by, created_at, updated_at";

impl RolloutRow {
    /// The canary percentage now (0 in the shadow phase).
    pub fn percent(&self) -> f64 {
        match self.state.as_str() {
            "canary" | "paused" => f64::from(
                *self
                    .steps
                    .get(self.step_index.max(0) as usize)
                    .unwrap_or(&0.0),
            ),
            _ => 0.0,
        }
    }

    /// Whether it still splits traffic.
    pub fn is_active(&self) -> bool {
        matches!(self.state.as_str(), "shadow" | "canary" | "paused")
    }
}

/// The active rollout, if any.
pub async fn active(db: &sqlx::PgPool) -> Result<Option<RolloutRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from rollouts where state in ('shadow', 'canary', 'paused')"
    )))
    .fetch_optional(db)
    .await
}

/// Metrics of one cohort over a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CohortMetrics {
    /// Connections.
    pub connections: i64,
    /// Share with an abnormal close.
    pub abnormal_close_rate: f64,
    /// Share with a dead peer.
    pub dead_peer_rate: f64,
    /// p99 of upstream→client first-message latency, ms.
    pub p99_first_message_ms: f64,
    /// Mean replay cost.
    pub replay_cost: f64,
}

async fn cohort_metrics(
    db: &sqlx::PgPool,
    cohort: &str,
    since: DateTime<Utc>,
) -> Result<CohortMetrics, sqlx::Error> {
    let row: (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "select count(*),
                avg(case when close_code in (1006, 1011) or error_class is not null then 1.0 else 0.0 end)::float8,
                avg(case when dead_peer then 1.0 else 0.0 end)::float8,
                (percentile_cont(0.99) within group (order by u2c_first_message_us) / 1000.0)::float8
           from profiles where cohort = $1 and started_at >= $2",
    )
    .bind(cohort)
    .bind(since)
    .fetch_one(db)
    .await?;
    let costs = replay_costs(db, cohort, since).await?;
    Ok(CohortMetrics {
        connections: row.0,
        abnormal_close_rate: row.1.unwrap_or(0.0),
        dead_peer_rate: row.2.unwrap_or(0.0),
        p99_first_message_ms: row.3.unwrap_or(0.0),
        replay_cost: if costs.is_empty() {
            0.0
        } else {
            costs.iter().sum::<f64>() / costs.len() as f64
        },
    })
}

/// The replay cost of every connection of a cohort since a time, from its profile.
async fn replay_costs(
    db: &sqlx::PgPool,
    cohort: &str,
    since: DateTime<Utc>,
) -> Result<Vec<f64>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "select {} from profiles where cohort = $1 and started_at >= $2 limit 100000",
        tuning::sql::PROFILE_COLUMNS
    )))
    .bind(cohort)
    .bind(since)
    .fetch_all(db)
    .await?;
    let w = tuning::cost::CostWeights::default();
    rows.iter()
        .map(|r| {
            let p = tuning::sql::profile_from_row(r)?;
            Ok(tuning::cost::replay_cost(&p, &p.decision.settings, &w))
        })
        .collect()
}

/// The verdict of a gate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Verdict {
    /// Not worse beyond the tolerances.
    Pass,
    /// Worse: the reasons.
    Fail(Vec<String>),
    /// Too few connections in a cohort.
    Wait,
}

/// Compare canary with control.
pub fn judge(t: &Tolerances, min: i64, canary: &CohortMetrics, control: &CohortMetrics) -> Verdict {
    if canary.connections < min || control.connections < min {
        return Verdict::Wait;
    }
    let mut worse = Vec::new();
    let mut check = |name: &str, c: f64, k: f64, tol: f64| {
        if c - k > tol {
            worse.push(format!(
                "{name}: canary {c:.4} vs control {k:.4} (tolerance {tol})"
            ));
        }
    };
    check(
        "abnormal_close_rate",
        canary.abnormal_close_rate,
        control.abnormal_close_rate,
        t.abnormal_close_rate,
    );
    check(
        "dead_peer_rate",
        canary.dead_peer_rate,
        control.dead_peer_rate,
        t.dead_peer_rate,
    );
    check(
        "p99_first_message_ms",
        canary.p99_first_message_ms,
        control.p99_first_message_ms,
        t.p99_first_message_ms,
    );
    check(
        "replay_cost",
        canary.replay_cost,
        control.replay_cost,
        t.replay_cost,
    );
    if worse.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Fail(worse)
    }
}

/// A move of the rollout's state machine, decided by one controller pass.
struct Transition {
    state: &'static str,
    reason: String,
    step_index: Option<i32>,
    gate: Option<serde_json::Value>,
    /// The audit action's suffix (`rollout.<what>`).
    what: String,
}

/// Apply a transition and its audit entry in one transaction — a controller killed between
/// the two can never leave a state change without its audit line — then tell every replica.
async fn apply(
    app: &crate::api::AppState,
    r: &RolloutRow,
    t: &Transition,
) -> Result<(), crate::api::ApiError> {
    let mut tx = app.db.begin().await?;
    sqlx::query(
        "update rollouts set state = $2, state_reason = $3, step_index = coalesce($4, step_index),
                last_gate = coalesce($5, last_gate), step_started_at = case when $4 is not null or $2 <> state then now() else step_started_at end,
                updated_at = now()
          where id = $1",
    )
    .bind(r.id)
    .bind(t.state)
    .bind(&t.reason)
    .bind(t.step_index)
    .bind(&t.gate)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into audit_log (actor, action, target, old_value, new_value, comment) values ($1, $2, $3, $4, $5, $6)",
    )
    .bind("rollout-controller")
    .bind(format!("rollout.{}", t.what))
    .bind(format!("rollout/{}", r.id))
    .bind(json!({ "state": r.state, "step_index": r.step_index }))
    .bind(json!({ "state": t.state, "step_index": t.step_index.unwrap_or(r.step_index) }))
    .bind(&t.reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    crate::state::notify(&app.db, "rollouts").await?;
    let _ = app.state.reload(&app.db).await;
    Ok(())
}

/// One controller pass over the active rollout. Returns what it did, for logs and tests.
pub async fn tick(app: &crate::api::AppState) -> Result<Option<String>, crate::api::ApiError> {
    let db = &app.db;
    let Some(r) = active(db).await? else {
        return Ok(None);
    };
    let step = Duration::from_secs(r.step_duration_s.max(1) as u64);
    let elapsed = (Utc::now() - r.step_started_at)
        .to_std()
        .unwrap_or_default();
    let to = |state, reason: &str, step_index, gate, what: &str| Transition {
        state,
        reason: reason.to_string(),
        step_index,
        gate,
        what: what.to_string(),
    };
    let transition = match r.state.as_str() {
        "shadow" if elapsed >= step => {
            Some(to("canary", "shadow phase over", Some(0), None, "canary"))
        }
        "canary" if elapsed >= step => {
            let canary = cohort_metrics(db, "canary", r.step_started_at).await?;
            let control = cohort_metrics(db, "control", r.step_started_at).await?;
            let verdict = judge(
                &r.tolerances,
                i64::from(r.min_connections),
                &canary,
                &control,
            );
            let gate = json!({ "step": r.step_index, "percent": r.percent(), "canary": canary,
                               "control": control, "verdict": verdict });
            match verdict {
                // Passing the step before 100 % is the promotion: at 100 % there is no control.
                Verdict::Pass
                    if r.steps
                        .get(r.step_index as usize + 1)
                        .is_none_or(|p| *p >= 100.0) =>
                {
                    crate::api::promote_candidate(app, &r, "rollout-controller").await?;
                    Some(to(
                        "promoted",
                        "every step passed its gates",
                        None,
                        Some(gate),
                        "promoted",
                    ))
                }
                Verdict::Pass => Some(to(
                    "canary",
                    "gates passed",
                    Some(r.step_index + 1),
                    Some(gate),
                    "step",
                )),
                Verdict::Fail(why) => Some(to(
                    "rolled_back",
                    &why.join("; "),
                    None,
                    Some(gate),
                    "rolled_back",
                )),
                Verdict::Wait if elapsed >= step * 3 => Some(to(
                    "paused",
                    "inconclusive: too few connections",
                    None,
                    Some(gate),
                    "paused",
                )),
                Verdict::Wait => {
                    sqlx::query(
                        "update rollouts set last_gate = $2, updated_at = now() where id = $1",
                    )
                    .bind(r.id)
                    .bind(gate)
                    .execute(db)
                    .await?;
                    None
                }
            }
        }
        _ => None,
    };
    let Some(t) = transition else {
        return Ok(None);
    };
    apply(app, &r, &t).await?;
    let did = match t.step_index {
        Some(i) if t.what == "step" => format!("step {i}"),
        _ => t.what.clone(),
    };
    tracing::info!(rollout = r.id, action = %did, "rollout controller");
    Ok(Some(did))
}

/// Run the controller forever in whichever replica holds the advisory lock.
pub async fn controller(app: crate::api::AppState, every: Duration) {
    const LOCK: i64 = 7_446_180_002;
    loop {
        let conn = match app.db.acquire().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(every).await;
                continue;
            }
        };
        let mut conn = conn.detach();
        let got: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
            .bind(LOCK)
            .fetch_one(&mut conn)
            .await
            .unwrap_or(false);
        if !got {
            drop(conn);
            tokio::time::sleep(every).await;
            continue;
        }
        tracing::info!("this replica runs the rollout controller");
        let mut tick_every = tokio::time::interval(every);
        loop {
            tick_every.tick().await;
            // The lock lives as long as this connection: check it is still up.
            if sqlx::query("select 1").execute(&mut conn).await.is_err() {
                tracing::warn!("lost the controller lock connection");
                break;
            }
            if let Err(e) = tick(&app).await {
                tracing::warn!(error = %e, "rollout controller pass failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: i64, abnormal: f64, cost: f64) -> CohortMetrics {
        CohortMetrics {
            connections: n,
            abnormal_close_rate: abnormal,
            dead_peer_rate: 0.0,
            p99_first_message_ms: 1.0,
            replay_cost: cost,
        }
    }

    #[test]
    fn gates_pass_fail_and_wait() {
        let t = Tolerances::default();
        assert_eq!(
            judge(&t, 10, &m(50, 0.01, 0.2), &m(50, 0.0, 0.19)),
            Verdict::Pass
        );
        match judge(&t, 10, &m(50, 0.2, 0.2), &m(50, 0.0, 0.2)) {
            Verdict::Fail(w) => assert!(w[0].starts_with("abnormal_close_rate"), "{w:?}"),
            v => panic!("{v:?}"),
        }
        match judge(&t, 10, &m(50, 0.0, 200_000.0), &m(50, 0.0, 0.2)) {
            Verdict::Fail(w) => assert!(w[0].starts_with("replay_cost"), "{w:?}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            judge(&t, 10, &m(5, 1.0, 9.0), &m(50, 0.0, 0.0)),
            Verdict::Wait
        );
    }
}
