//! `GET /v1/workers`: the worker fleet as its heartbeats describe it.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use pinq_core::db;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Value>> {
    if !caller.admin {
        return Err(ApiError::Forbidden(
            "the worker fleet is visible to admin tokens only".into(),
        ));
    }
    let workers = db::list_workers(&state.pool).await?;
    Ok(Json(json!({ "workers": workers })))
}
