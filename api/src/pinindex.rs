//! `GET /v1/pin-index?backend=&cid=&status=&limit=&after=`: rows of the pin index, what
//! pinq believes each backend holds.

use axum::Extension;
use axum::Json;
use axum::extract::{Query, State};
use pinq_core::cid::PinCid;
use pinq_core::stats::{self, PinFilter};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::batches::page_limit;
use crate::error::{ApiError, ApiResult, Problem};
use crate::input::check_text;

#[derive(Debug, Deserialize)]
pub struct PinQuery {
    backend: Option<String>,
    cid: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    /// Opaque cursor from the previous page's `next`.
    after: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<PinQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("invalid query: {e}"), vec![]))?;
    let limit = page_limit(q.limit)?;
    // The backend name and the cursor reach the database as text.
    let mut problems = Vec::new();
    if let Some(Err(p)) = q.backend.as_deref().map(|b| check_text("query:backend", b)) {
        problems.push(p);
    }
    if let Some(Err(p)) = q.after.as_deref().map(|a| check_text("query:after", a)) {
        problems.push(p);
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid("invalid pin index query", problems));
    }
    let cid = match q.cid.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(PinCid::parse(c).map(|c| c.canonical()).map_err(|e| {
            ApiError::invalid(
                format!("invalid cid '{c}': {e}"),
                vec![Problem::at("query:cid", "not a CID")],
            )
        })?),
    };
    if let Some(s) = q.status.as_deref()
        && !["pinned", "missing", "unmanaged"].contains(&s)
    {
        return Err(ApiError::invalid(
            format!("unknown status '{s}'"),
            vec![Problem::at(
                "query:status",
                "expected pinned, missing or unmanaged",
            )],
        ));
    }
    let after = match q.after.as_deref() {
        None => None,
        Some(a) => Some(
            a.split_once('/')
                .map(|(b, c)| (b.to_owned(), c.to_owned()))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "invalid cursor; pass the 'next' value of the previous page as 'after'",
                        vec![Problem::at("query:after", "not a cursor")],
                    )
                })?,
        ),
    };
    let filter = PinFilter {
        owner: caller.owner_filter().map(str::to_owned),
        backend: q.backend,
        cid,
        status: q.status,
        after,
        limit,
    };
    let rows = stats::list_pins(&state.pool, &filter).await?;
    let next = if rows.len() as i64 == limit {
        rows.last().map(|p| format!("{}/{}", p.backend, p.cid))
    } else {
        None
    };
    Ok(Json(json!({ "pins": rows, "next": next })))
}
