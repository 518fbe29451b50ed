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
use crate::input::{TIME_RANGE, storable_time};

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
            Ok(c) => Some(c),
            Err(message) => {
                problems.push(Problem::at("query:after", message));
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

/// A `next` cursor: `<created_at in microseconds since the epoch>_<job id>`.
fn parse_cursor(s: &str) -> Result<(DateTime<Utc>, Uuid), String> {
    let not_a_cursor = || "not a cursor; pass the 'next' value of the previous page".to_owned();
    let (micros, id) = s.split_once('_').ok_or_else(not_a_cursor)?;
    let at = micros
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(not_a_cursor)?;
    if !storable_time(&at) {
        return Err(format!("the cursor's time {TIME_RANGE}"));
    }
    Ok((at, id.parse().map_err(|_| not_a_cursor())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_parse_within_the_storable_times() {
        let zero = Uuid::nil();
        let (at, id) = parse_cursor(&format!("1700000000000000_{zero}")).unwrap();
        assert_eq!(at.timestamp_micros(), 1_700_000_000_000_000);
        assert_eq!(id, zero);
        assert!(parse_cursor(&format!("-210866803200000000_{zero}")).is_ok());
        let e = parse_cursor(&format!("-210866803200000001_{zero}")).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        let e = parse_cursor(&format!("-300000000000000000_{zero}")).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        for bad in ["", "12", "x_y", &format!("{}_{zero}", i64::MAX), "1_nope"] {
            assert!(
                parse_cursor(bad).unwrap_err().contains("not a cursor"),
                "{bad}"
            );
        }
    }
}
