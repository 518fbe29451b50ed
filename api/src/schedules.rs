//! Admin API for cron schedules: `GET /v1/schedules`, `PATCH /v1/schedules/{name}`,
//! `POST /v1/schedules/{name}/run`, `GET /v1/schedules/{name}/runs`.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use pinq_core::schedule::{self, CatchUp, Patch, Run, Schedule};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::backends::require_admin;
use crate::error::{ApiError, ApiResult, Problem, query_error};
use crate::input::{ApiPath, NUL, TIME_RANGE, nul_paths, read_body, storable_time};

/// A schedule as the API shows it: its row, the next fire time computed from its
/// expression, and its latest run.
fn view(s: &Schedule, last: Option<&Run>, now: DateTime<Utc>) -> Value {
    let next = if s.enabled {
        schedule::parse_cron(&s.cron)
            .ok()
            .and_then(|c| schedule::next_fire(&c, s.last_fire_at, now))
    } else {
        None
    };
    json!({
        "name": s.name,
        "cron": s.cron,
        "task": s.task,
        "args": s.args.0,
        "enabled": s.enabled,
        "catch_up": s.catch_up,
        "last_fire_at": s.last_fire_at,
        "next_fire_at": next,
        "last_outcome": last.map(|r| r.status.as_str()),
        "last_run": last,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    })
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Value>> {
    require_admin(&caller)?;
    let schedules = schedule::list(&state.pool).await?;
    let last: HashMap<String, Run> = schedule::last_runs(&state.pool)
        .await?
        .into_iter()
        .map(|r| (r.schedule.clone(), r))
        .collect();
    let mut counts: HashMap<String, Map<String, Value>> = HashMap::new();
    for (name, status, n) in schedule::run_counts(&state.pool).await? {
        counts.entry(name).or_default().insert(status, json!(n));
    }
    let now = Utc::now();
    let items: Vec<Value> = schedules
        .iter()
        .map(|s| {
            let mut v = view(s, last.get(&s.name), now);
            v["run_counts"] = Value::Object(counts.remove(&s.name).unwrap_or_default());
            v
        })
        .collect();
    Ok(Json(json!({ "schedules": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    cron: Option<String>,
    enabled: Option<bool>,
    catch_up: Option<String>,
    args: Option<Value>,
}

pub async fn patch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    require_admin(&caller)?;
    let body = read_body(body)?;
    let req: PatchBody = serde_json::from_slice(&body).map_err(|e| ApiError::Invalid {
        code: "malformed_json",
        message: format!(
            "expected {{\"cron\"?, \"enabled\"?, \"catch_up\"?, \"args\"?}}: {e} (line {}, column {})",
            e.line(),
            e.column()
        ),
        details: vec![],
    })?;
    let mut problems = Vec::new();
    if let Some(Err(e)) = req.cron.as_deref().map(schedule::parse_cron) {
        problems.push(Problem::at("/cron", e.to_string()));
    }
    let catch_up = match req.catch_up.as_deref() {
        None => None,
        Some(s) => match s.parse::<CatchUp>() {
            Ok(c) => Some(c),
            Err(_) => {
                problems.push(Problem::at(
                    "/catch_up",
                    "catch_up must be 'latest' or 'none'",
                ));
                None
            }
        },
    };
    match &req.args {
        None => {}
        Some(Value::Object(args)) => {
            for path in nul_paths(args, "/args") {
                problems.push(Problem::at(path, format!("args {NUL}, in keys or values")));
            }
        }
        Some(_) => problems.push(Problem::at("/args", "args must be a JSON object")),
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid("invalid schedule change", problems));
    }
    let patch = Patch {
        cron: req.cron.map(|c| c.trim().to_owned()),
        enabled: req.enabled,
        catch_up,
        args: req.args,
    };
    let updated = schedule::update(&state.pool, &name, &patch)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no schedule named '{name}'")))?;
    tracing::info!(schedule = %name, cron = %updated.cron, enabled = updated.enabled, "schedule changed");
    Ok(Json(view(&updated, None, Utc::now())))
}

pub async fn run_now(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Run>)> {
    require_admin(&caller)?;
    let run = schedule::request_run(&state.pool, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no schedule named '{name}'")))?;
    tracing::info!(schedule = %name, run_id = run.id, "manual run requested");
    Ok((StatusCode::ACCEPTED, Json(run)))
}

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    status: Option<String>,
    before: Option<DateTime<Utc>>,
    limit: Option<i64>,
}

pub async fn runs(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    require_admin(&caller)?;
    let Query(q) = query.map_err(query_error)?;
    const STATUSES: [&str; 5] = ["pending", "running", "succeeded", "failed", "skipped"];
    if q.status.as_deref().is_some_and(|s| !STATUSES.contains(&s)) {
        return Err(ApiError::invalid(
            "invalid status filter",
            vec![Problem::at(
                "query:status",
                "expected pending, running, succeeded, failed or skipped",
            )],
        ));
    }
    if q.before.is_some_and(|t| !storable_time(&t)) {
        return Err(ApiError::invalid(
            format!("before {TIME_RANGE}"),
            vec![Problem::at("query:before", TIME_RANGE)],
        ));
    }
    if schedule::get(&state.pool, &name).await?.is_none() {
        return Err(ApiError::NotFound(format!("no schedule named '{name}'")));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let runs = schedule::runs(&state.pool, &name, q.status.as_deref(), q.before, limit).await?;
    Ok(Json(json!({ "schedule": name, "runs": runs })))
}
