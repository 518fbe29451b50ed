//! `POST /v1/backends`, `GET /v1/backends` (with each backend's health and latest probe),
//! `GET /v1/backends/{name}/health` (the probe history): the IPFS endpoints pinq pins on.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use pinq_core::db::{self, Backend};
use pinq_core::health;
use pinq_core::model::{BackendKind, BackendName};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Problem, query_error};
use crate::input::{ApiPath, NUL, TIME_RANGE, read_body, storable_time};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBackend {
    name: String,
    kind: String,
    url: String,
}

pub(crate) fn require_admin(caller: &Caller) -> ApiResult<()> {
    if caller.admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "this route needs an admin token; user tokens see only their own pins, batches and jobs"
                .into(),
        ))
    }
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Backend>)> {
    require_admin(&caller)?;
    let body = read_body(body)?;
    let req: CreateBackend = serde_json::from_slice(&body).map_err(|e| ApiError::Invalid {
        code: "malformed_json",
        message: format!(
            "expected {{\"name\",\"kind\",\"url\"}}: {e} (line {}, column {})",
            e.line(),
            e.column()
        ),
        details: vec![],
    })?;
    let mut problems = Vec::new();
    if let Err(e) = BackendName::parse(&req.name) {
        problems.push(Problem::at("/name", e.to_string()));
    }
    if req.kind.parse::<BackendKind>().is_err() {
        problems.push(Problem::at(
            "/kind",
            format!("unsupported kind '{}'; supported: kubo", req.kind),
        ));
    }
    let url_ok = (req.url.starts_with("http://") || req.url.starts_with("https://"))
        && req.url.len() <= 2048
        && !req.url.chars().any(char::is_whitespace);
    if req.url.contains('\0') {
        problems.push(Problem::at("/url", format!("url {NUL}")));
    } else if !url_ok {
        problems.push(Problem::at(
            "/url",
            "url must be an http:// or https:// URL of the node's RPC API, e.g. http://127.0.0.1:5001",
        ));
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid("invalid backend", problems));
    }
    let url = req.url.trim_end_matches('/');
    match db::insert_backend(&state.pool, &req.name, &req.kind, url).await {
        Ok(b) => {
            tracing::info!(backend = %b.name, url = %b.url, "backend registered");
            Ok((StatusCode::CREATED, Json(b)))
        }
        Err(e) if db::is_unique_violation(&e) => Err(ApiError::Conflict(format!(
            "a backend named '{}' already exists",
            req.name
        ))),
        Err(e) => Err(e.into()),
    }
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Value>> {
    require_admin(&caller)?;
    let backends = db::list_backends(&state.pool).await?;
    let mut health: std::collections::HashMap<uuid::Uuid, health::BackendHealth> =
        health::all_backend_health(&state.pool)
            .await?
            .into_iter()
            .map(|h| (h.id, h))
            .collect();
    let items: Vec<Value> = backends
        .into_iter()
        .map(|b| {
            let h = health.remove(&b.id);
            let mut v = serde_json::to_value(&b).unwrap_or(Value::Null);
            v["health"] = health_view(h.as_ref());
            v
        })
        .collect();
    Ok(Json(json!({ "backends": items })))
}

/// A backend's current health and its latest probe, as `GET /v1/backends` shows them.
fn health_view(h: Option<&health::BackendHealth>) -> Value {
    let Some(h) = h else { return Value::Null };
    let latest_probe = h.last_probe_at.map(|at| {
        json!({
            "probed_at": at,
            "ok": h.last_probe_ok,
            "latency_ms": h.last_probe_latency_ms,
            "error": h.last_probe_error,
            "node_version": h.node_version,
            "repo_size": h.repo_size,
            "num_objects": h.num_objects,
        })
    });
    json!({
        "status": h.status,
        "status_since": h.status_since,
        "consecutive_failures": h.consecutive_failures,
        "consecutive_successes": h.consecutive_successes,
        "latest_probe": latest_probe,
    })
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    before: Option<DateTime<Utc>>,
    limit: Option<i64>,
}

/// `GET /v1/backends/{name}/health`: current health and the probe history, newest first.
pub async fn health_history(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    require_admin(&caller)?;
    let Query(q) = query.map_err(query_error)?;
    if q.before.is_some_and(|t| !storable_time(&t)) {
        return Err(ApiError::invalid(
            format!("before {TIME_RANGE}"),
            vec![Problem::at("query:before", TIME_RANGE)],
        ));
    }
    let h = health::backend_health(&state.pool, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backend named '{name}'")))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let probes = health::probes(&state.pool, h.id, q.before, limit).await?;
    let mut v = health_view(Some(&h));
    v["backend"] = json!(name);
    v["probes"] = json!(probes);
    Ok(Json(v))
}
