//! `GET /v1/jobs?state=&batch=&cid=&limit=&after=`: jobs across batches, newest first,
//! scoped to the caller's own jobs (admins see all).

use axum::Extension;
use axum::Json;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use pinq_core::cid::PinCid;
use pinq_core::model::JobState;
use pinq_core::stats::{self, JobFilter};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::batches::page_limit;
use crate::error::{ApiError, ApiResult, Problem};

#[derive(Debug, Deserialize)]
pub struct JobsQuery {
    state: Option<String>,
    batch: Option<String>,
    cid: Option<String>,
    limit: Option<i64>,
    /// Opaque cursor from the previous page's `next`.
    after: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("invalid query: {e}"), vec![]))?;
    let limit = page_limit(q.limit)?;
    let mut problems = Vec::new();
    let job_state = match q.state.as_deref() {
        None => None,
        Some(s) => match s.parse::<JobState>() {
            Ok(st) => Some(st),
            Err(_) => {
                problems.push(Problem::at(
                    "query:state",
                    format!(
                        "unknown state '{s}'; expected queued, running, retry_wait, succeeded, failed or cancelled"
                    ),
                ));
                None
            }
        },
    };
    let batch = match q.batch.as_deref() {
        None => None,
        Some(b) => match b.parse::<Uuid>() {
            Ok(id) => Some(id),
            Err(_) => {
                problems.push(Problem::at("query:batch", "batch ids are UUIDs"));
                None
            }
        },
    };
    let cids = match q.cid.as_deref() {
        None => vec![],
        Some(c) => match PinCid::parse(c.trim()) {
            Ok(cid) => {
                let mut v = vec![cid.to_string(), cid.canonical()];
                v.dedup();
                v
            }
            Err(e) => {
                problems.push(Problem::at("query:cid", format!("not a CID: {e}")));
                vec![]
            }
        },
    };
    let after = match q.after.as_deref() {
        None => None,
        Some(a) => match parse_cursor(a) {
            Some(c) => Some(c),
            None => {
                problems.push(Problem::at(
                    "query:after",
                    "not a cursor; pass the 'next' value of the previous page",
                ));
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(ApiError::invalid("invalid job query", problems));
    }
    let filter = JobFilter {
        owner: caller.owner_filter().map(str::to_owned),
        state: job_state,
        batch,
        cids,
        after,
        limit,
    };
    let rows = stats::list_jobs(&state.pool, &filter).await?;
    let next = if rows.len() as i64 == limit {
        rows.last()
            .map(|j| format!("{}_{}", j.created_at.timestamp_micros(), j.id))
    } else {
        None
    };
    Ok(Json(json!({ "jobs": rows, "next": next })))
}

fn parse_cursor(s: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = s.split_once('_')?;
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, id.parse().ok()?))
}
