//! `GET /v1/jobs/{id}`: one job with every attempt, the answer to "why did this fail?".

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use pinq_core::db::{self, CancelResult};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::batches::parse_id;
use crate::error::{ApiError, ApiResult};
use crate::input::ApiPath;

pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "job")?;
    let job = db::get_job(&state.pool, id, caller.owner_filter())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let attempts = db::job_attempts(&state.pool, id).await?;
    let mut v = serde_json::to_value(&job).map_err(|e| ApiError::Internal(e.into()))?;
    if let Value::Object(m) = &mut v {
        m.insert("attempts".into(), json!(attempts));
    }
    Ok(Json(v))
}

/// `POST /v1/jobs/{id}/cancel`: cancels a job that has not started, or asks the worker
/// running it to stop. 409 if it already finished.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let id = parse_id(&id, "job")?;
    match db::cancel_job(&state.pool, id, caller.owner_filter()).await? {
        None => Err(ApiError::NotFound(format!("no job {id}"))),
        Some(CancelResult::AlreadyFinished) => Err(ApiError::Conflict(format!(
            "job {id} already finished; only queued, waiting or running jobs can be cancelled"
        ))),
        Some(result) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "result": result})),
        )),
    }
}

/// `POST /v1/jobs/{id}/retry`: re-drives a failed job with a fresh attempt budget.
pub async fn retry(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let id = parse_id(&id, "job")?;
    let Some(owed) = db::redrive_failed(&state.pool, Some(id), None, caller.owner_filter()).await?
    else {
        return match db::get_job(&state.pool, id, caller.owner_filter()).await? {
            None => Err(ApiError::NotFound(format!("no job {id}"))),
            Some(job) => Err(ApiError::Conflict(format!(
                "job {id} is {}; only failed jobs can be retried",
                job.state
            ))),
        };
    };
    crate::batches::dispatch(&state, owed);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "state": "queued"})),
    ))
}
