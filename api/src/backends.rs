//! `POST /v1/backends`, `GET /v1/backends`: the IPFS endpoints pinq pins on.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use pinq_core::db::{self, Backend};
use pinq_core::model::{BackendKind, BackendName};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Problem};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBackend {
    name: String,
    kind: String,
    url: String,
}

fn require_admin(caller: &Caller) -> ApiResult<()> {
    if caller.admin {
        Ok(())
    } else {
        Err(ApiError::NotFound("no such route for this token".into()))
    }
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Backend>)> {
    require_admin(&caller)?;
    let body =
        body.map_err(|e| ApiError::invalid(format!("could not read the body: {e}"), vec![]))?;
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
    if !url_ok {
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
    Ok(Json(json!({ "backends": backends })))
}
