//! `DELETE /v1/backends/{name}` and `POST /v1/backends/{name}/check`: removing a backend
//! and probing one on demand (the probe the scheduler's `health-check` task runs, recorded
//! the same way).

use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use pinq_core::health::{self, Thresholds};
use pinq_core::kubo::KuboClient;
use pinq_core::stats::{self, BackendDelete};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::backends::require_admin;
use crate::error::{ApiError, ApiResult, query_error};
use crate::input::ApiPath;

/// The probe timeout and thresholds of the scheduler's defaults (`PINQ_HEALTH_*`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const THRESHOLDS: Thresholds = Thresholds {
    down_after: 2,
    healthy_after: 2,
    slow: Duration::from_secs(2),
};

#[derive(Debug, serde::Deserialize)]
pub struct DeleteQuery {
    /// Also delete the backend's finished jobs (their history).
    #[serde(default)]
    purge: bool,
}

/// Deletes a backend; 409 while it still has queued, running or waiting jobs, and 409
/// while it has finished jobs unless `?purge=true` says to delete them with it.
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    require_admin(&caller)?;
    match stats::delete_backend(&state.pool, &name, q.purge).await? {
        BackendDelete::NotFound => Err(ApiError::NotFound(format!("no backend named '{name}'"))),
        BackendDelete::Busy { unfinished } => Err(ApiError::Conflict(format!(
            "backend '{name}' still has {unfinished} unfinished job(s); cancel them or wait until they finish"
        ))),
        BackendDelete::HasHistory { finished } => Err(ApiError::Conflict(format!(
            "backend '{name}' has {finished} finished job(s) in its history; delete them with it by passing purge=true (pinq backends rm --purge), or keep the backend"
        ))),
        BackendDelete::Deleted { jobs_removed } => {
            tracing::info!(backend = %name, jobs_removed, "backend deleted");
            Ok(Json(
                json!({"name": name, "deleted": true, "jobs_removed": jobs_removed}),
            ))
        }
    }
}

/// Probes the backend now, records the probe, and returns it with the resulting status.
pub async fn check(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    require_admin(&caller)?;
    let target = health::probe_targets(&state.pool)
        .await?
        .into_iter()
        .find(|t| t.name == name);
    let Some(target) = target else {
        return match health::backend_health(&state.pool, &name).await? {
            Some(_) => Err(ApiError::Conflict(format!(
                "backend '{name}' is disabled; enable it before checking it"
            ))),
            None => Err(ApiError::NotFound(format!("no backend named '{name}'"))),
        };
    };
    let probe = if target.kind == "kubo" {
        health::probe_kubo(KuboClient::http_client(), &target.url, PROBE_TIMEOUT).await
    } else {
        pinq_core::health::ProbeRecord {
            ok: false,
            error: Some(format!(
                "health checks do not support backends of kind '{}' yet",
                target.kind
            )),
            ..Default::default()
        }
    };
    let status = health::record_probe(&state.pool, target.id, &probe, THRESHOLDS)
        .await?
        .map(|(_, after)| after.as_str());
    Ok((
        StatusCode::OK,
        Json(json!({
            "name": name,
            "url": target.url,
            "ok": probe.ok,
            "latency_ms": probe.latency_ms,
            "error": probe.error,
            "peer_id": probe.peer_id,
            "node_version": probe.node_version,
            "repo_size": probe.repo_size,
            "num_objects": probe.num_objects,
            "status": status,
        })),
    ))
}
