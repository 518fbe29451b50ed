//! `GET /v1/jobs/{id}`: one job with every attempt, the answer to "why did this fail?".

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use pinq_core::db;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::batches::parse_id;
use crate::error::{ApiError, ApiResult};

pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
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
