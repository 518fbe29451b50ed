//! `POST /v1/batches` and the batch reads.
//!
//! A batch is validated whole before anything is stored: every bad operation is reported
//! by index, and a rejected batch writes nothing. An accepted batch is committed in one
//! transaction (all its jobs in one statement), answered 202, and then published to the
//! broker in the background; if that publish fails or the process dies first, the
//! scheduler's relay publishes the jobs instead.

use std::collections::HashMap;
use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use chrono::{DateTime, Utc};
use pinq_core::cid::PinCid;
use pinq_core::db::{self, NewBatch, NewJob, StateCounts, Stored};
use pinq_core::model::{BackendName, JobState, Op, Priority};
use pinq_core::retry::RetryPolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::batch_body::{Field, RawBody, RawOp, RawOps};
use crate::error::{ApiError, ApiResult, Problem, query_error};
use crate::input::{ApiPath, NUL, nul_paths, read_body};

/// Most problems listed in one error response; the message says how many there were.
const MAX_PROBLEMS: usize = 1000;
const MAX_NAME_LEN: usize = 255;
const MAX_META_BYTES: usize = 4096;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

#[derive(Debug, Serialize)]
pub struct Submitted {
    pub id: Uuid,
    pub jobs: i64,
}

pub async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Submitted>)> {
    let body = read_body(body)?;
    check_json_content_type(&headers)?;
    let idempotency_key = idempotency_key(&headers)?;
    let request = parse_request(&body, state.max_batch_ops, state.default_retry)?;

    // Resolve backend names: the requested ones must all exist; none named means every
    // enabled backend.
    let backends = if request.backends.is_empty() {
        let all: Vec<_> = db::list_backends(&state.pool)
            .await?
            .into_iter()
            .filter(|b| b.enabled)
            .collect();
        if all.is_empty() {
            return Err(ApiError::invalid(
                "no backend is registered; add one with POST /v1/backends",
                vec![Problem::at("/backends", "no enabled backend to pin on")],
            ));
        }
        all
    } else {
        let names: Vec<String> = request
            .backends
            .iter()
            .map(|b| b.as_str().to_owned())
            .collect();
        let found = db::backends_by_name(&state.pool, &names).await?;
        let by_name: HashMap<&str, _> = found.iter().map(|b| (b.name.as_str(), b)).collect();
        let problems: Vec<Problem> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| !by_name.contains_key(n.as_str()))
            .map(|(i, n)| Problem::at(format!("/backends/{i}"), format!("unknown backend '{n}'")))
            .collect();
        if !problems.is_empty() {
            return Err(ApiError::invalid("batch names unknown backends", problems));
        }
        names
            .iter()
            .filter_map(|n| by_name.get(n.as_str()).map(|b| (*b).clone()))
            .collect()
    };

    // A user token may unpin only what its owner holds a reference to in the pin index:
    // the nodes are shared, and one tenant must not remove another's pins (or pins made
    // outside pinq). Its unpin removes that reference, and the node's pin only if no other
    // owner holds one.
    if !caller.admin {
        let mut wanted = Vec::new();
        for (i, op) in request.ops.iter().enumerate() {
            let removed = match op.op {
                Op::Unpin => Some(op.cid),
                Op::Replace => op.replaces,
                Op::Pin => None,
            };
            if let Some(cid) = removed {
                for backend in &backends {
                    wanted.push((i, backend.id, backend.name.clone(), cid));
                }
            }
        }
        if !wanted.is_empty() {
            let pairs: Vec<(Uuid, String)> = wanted
                .iter()
                .map(|(_, b, _, c)| (*b, c.canonical()))
                .collect();
            let foreign = db::pins_not_owned_by(&state.pool, &caller.owner, &pairs).await?;
            let problems: Vec<Problem> = wanted
                .iter()
                .filter(|(_, b, _, c)| foreign.contains(&(*b, c.canonical())))
                .map(|(i, _, name, c)| {
                    let field = if request.ops[*i].op == Op::Replace { "replaces" } else { "cid" };
                    Problem::op(
                        *i,
                        field,
                        format!("{c} is not pinned by this token's owner on backend '{name}'; only your own pins can be removed"),
                    )
                })
                .collect();
            if !problems.is_empty() {
                return Err(ApiError::invalid(
                    "batch rejected: it would remove pins this token does not own; nothing was stored",
                    problems,
                ));
            }
        }
    }

    let mut jobs = Vec::with_capacity(request.ops.len() * backends.len());
    for (seq, op) in request.ops.iter().enumerate() {
        let (cid_key, cid) = op.cid.canonical_and_spelling();
        let (replaces_key, replaces_cid) = op.replaces.map(|c| c.canonical_and_spelling()).unzip();
        for backend in &backends {
            jobs.push(NewJob {
                id: Uuid::now_v7(),
                seq: seq as i32,
                backend_id: backend.id,
                op: op.op,
                cid: cid.clone(),
                replaces_cid: replaces_cid.clone(),
                cid_key: cid_key.clone(),
                replaces_key: replaces_key.clone(),
                name: op.name.clone(),
                meta: Value::Object(op.meta.clone()),
                // An admin's unpin removes the pin for every owner; a user's, only its
                // owner's reference.
                unpin_all: caller.admin && op.op != Op::Pin,
            });
        }
    }
    let batch = NewBatch {
        id: Uuid::now_v7(),
        owner: caller.owner.clone(),
        priority: request.priority,
        backends: backends.iter().map(|b| b.name.clone()).collect(),
        retry: request.retry,
        // The body as sent: a retry sends the same bytes, whatever has changed on the
        // server since (its backends, its default retry policy).
        request_digest: idempotency_key
            .as_ref()
            .map(|_| Sha256::digest(&body).to_vec()),
        idempotency_key,
        jobs,
    };
    match db::insert_batch(&state.pool, &batch).await? {
        Stored::Created { id, owed } => {
            let count = owed.jobs.len() as i64;
            tracing::info!(batch_id = %id, jobs = count, priority = batch.priority.get(), "batch accepted");
            dispatch(&state, owed);
            Ok((StatusCode::ACCEPTED, Json(Submitted { id, jobs: count })))
        }
        Stored::Existing {
            id,
            job_count,
            same_request: true,
        } => Ok((
            StatusCode::OK,
            Json(Submitted {
                id,
                jobs: i64::from(job_count),
            }),
        )),
        Stored::Existing {
            id,
            same_request: false,
            ..
        } => Err(ApiError::IdempotencyKeyReused(format!(
            "this Idempotency-Key was already used for batch {id} with a different request \
             body; that batch is stored and this request was not (a new request needs a new key)"
        ))),
    }
}

/// Most background publishes under way at once. Each holds its batch's job ids, and
/// while the broker cannot be reached a publish waits out its connect timeout: without a
/// bound, a busy API would gather memory for as long as the broker stays away.
const MAX_PUBLISHES: usize = 64;

/// Publishes freshly committed jobs in the background, then deletes their dispatch-outbox
/// entry. Failure is logged, not returned: the jobs are safe in PostgreSQL, and the relay
/// publishes an entry still there after its grace period, as it does when too many
/// publishes are already under way to start this one.
pub(crate) fn dispatch(state: &AppState, owed: db::Owed) {
    if state.dispatches.len() >= MAX_PUBLISHES {
        tracing::warn!(
            jobs = owed.jobs.len(),
            "too many publishes under way (is the broker slow or away?); the relay will dispatch these jobs"
        );
        return;
    }
    let publisher = state.publisher.clone();
    let pool = state.pool.clone();
    state.dispatches.spawn(async move {
        // In slices, so that the publishes of concurrent batches take turns.
        for chunk in owed.jobs.chunks(1000) {
            if let Err(e) = publisher.publish_jobs(chunk).await {
                tracing::warn!(error = %e, jobs = owed.jobs.len(), "publish failed; the relay will dispatch these jobs");
                return;
            }
        }
        if let Err(e) = db::settle_dispatch(&pool, owed.entry).await {
            // The messages are out; the relay publishes them again after its grace
            // period, and workers drop the duplicates because claims are fenced.
            tracing::warn!(error = %e, "failed to settle a dispatch-outbox entry");
        }
    });
}

fn check_json_content_type(headers: &HeaderMap) -> ApiResult<()> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(()),
        Some(v) => {
            let v = v.to_str().unwrap_or("");
            let mime = v.split(';').next().unwrap_or("").trim();
            if mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json") {
                Ok(())
            } else {
                Err(ApiError::UnsupportedMediaType(format!(
                    "Content-Type must be application/json, not '{v}'"
                )))
            }
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v.to_str().map_err(|_| {
        ApiError::invalid(
            "Idempotency-Key must be visible ASCII",
            vec![Problem::at("header:Idempotency-Key", "not visible ASCII")],
        )
    })?;
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::invalid(
            format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"),
            vec![Problem::at("header:Idempotency-Key", "wrong length")],
        ));
    }
    Ok(Some(key.to_owned()))
}

/// A validated batch request.
#[derive(Debug)]
pub(crate) struct BatchRequest {
    pub priority: Priority,
    pub backends: Vec<BackendName>,
    pub retry: RetryPolicy,
    pub ops: Vec<ValidOp>,
}

#[derive(Debug)]
pub(crate) struct ValidOp {
    pub op: Op,
    pub cid: PinCid,
    pub replaces: Option<PinCid>,
    pub name: Option<String>,
    pub meta: Map<String, Value>,
}

/// Parses and validates a batch body, collecting every problem rather than stopping at
/// the first.
pub(crate) fn parse_request(
    body: &[u8],
    max_ops: usize,
    default_retry: RetryPolicy,
) -> ApiResult<BatchRequest> {
    let body: RawBody = serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        code: "malformed_json",
        message: format!(
            "request body is not valid JSON: {e} (line {}, column {})",
            e.line(),
            e.column()
        ),
        details: vec![],
    })?;
    let RawBody::Object(raw) = body else {
        return Err(ApiError::invalid(
            "request body must be a JSON object",
            vec![Problem::at("", "expected an object")],
        ));
    };

    let mut problems = Vec::new();
    let priority = match raw.priority {
        None | Some(Value::Null) => Priority::DEFAULT,
        Some(v) => match v.as_i64().map(Priority::new) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                problems.push(Problem::at("/priority", e.to_string()));
                Priority::DEFAULT
            }
            None => {
                problems.push(Problem::at(
                    "/priority",
                    format!("priority must be an integer from 0 to 9, got {v}"),
                ));
                Priority::DEFAULT
            }
        },
    };
    let backends = match raw.backends {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(items)) => {
            let mut names = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str().map(BackendName::parse) {
                    Some(Ok(n)) => {
                        if names.contains(&n) {
                            problems.push(Problem::at(
                                format!("/backends/{i}"),
                                format!("backend '{}' is listed twice", n.as_str()),
                            ));
                        } else {
                            names.push(n);
                        }
                    }
                    Some(Err(e)) => {
                        problems.push(Problem::at(format!("/backends/{i}"), e.to_string()))
                    }
                    None => problems.push(Problem::at(
                        format!("/backends/{i}"),
                        "backend names are strings",
                    )),
                }
            }
            names
        }
        Some(_) => {
            problems.push(Problem::at(
                "/backends",
                "backends must be an array of backend names",
            ));
            vec![]
        }
    };
    let retry = match raw.retry {
        None | Some(Value::Null) => default_retry,
        Some(v) => parse_retry(v, default_retry, &mut problems),
    };
    for key in &raw.unknown {
        problems.push(Problem::at(
            format!("/{key}"),
            format!("unknown field '{key}'; expected ops, priority, backends, retry"),
        ));
    }

    let items = match raw.ops {
        Some(RawOps::Items(items)) => items,
        None | Some(RawOps::Null) => {
            problems.push(Problem::at(
                "/ops",
                "ops is required: an array of operations",
            ));
            vec![]
        }
        Some(RawOps::Other) => {
            problems.push(Problem::at("/ops", "ops must be an array of operations"));
            vec![]
        }
    };
    if items.len() > max_ops {
        return Err(ApiError::PayloadTooLarge(format!(
            "a batch holds at most {max_ops} operations; this one has {}. Split it into several batches",
            items.len()
        )));
    }
    if items.is_empty() && problems.iter().all(|p| p.path != "/ops") {
        problems.push(Problem::at("/ops", "ops must hold at least one operation"));
    }
    let mut ops = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        if let Some(op) = parse_op(i, item, &mut problems) {
            ops.push(op);
        }
    }

    if problems.is_empty() {
        return Ok(BatchRequest {
            priority,
            backends,
            retry,
            ops,
        });
    }
    let total = problems.len();
    let bad_ops: std::collections::BTreeSet<usize> =
        problems.iter().filter_map(|p| p.index).collect();
    problems.truncate(MAX_PROBLEMS);
    let mut message = if bad_ops.is_empty() {
        format!("batch rejected: {total} problem(s); nothing was stored")
    } else {
        format!(
            "batch rejected: {} invalid operation(s), {total} problem(s) in all; nothing was stored",
            bad_ops.len()
        )
    };
    if total > MAX_PROBLEMS {
        message.push_str(&format!(" (the first {MAX_PROBLEMS} are listed)"));
    }
    Err(ApiError::invalid(message, problems))
}

fn parse_retry(v: Value, default: RetryPolicy, problems: &mut Vec<Problem>) -> RetryPolicy {
    let Value::Object(obj) = v else {
        problems.push(Problem::at("/retry", "retry must be an object"));
        return default;
    };
    let mut policy = default;
    for (key, value) in obj {
        let path = format!("/retry/{key}");
        let as_u64 = value.as_u64();
        match key.as_str() {
            "max_attempts" => match as_u64.and_then(|n| u32::try_from(n).ok()) {
                Some(n) => policy.max_attempts = n,
                None => problems.push(Problem::at(path, "max_attempts must be a positive integer")),
            },
            "base_ms" => match as_u64 {
                Some(n) => policy.base = Duration::from_millis(n),
                None => problems.push(Problem::at(path, "base_ms must be a non-negative integer")),
            },
            "max_delay_ms" => match as_u64 {
                Some(n) => policy.max_delay = Duration::from_millis(n),
                None => problems.push(Problem::at(
                    path,
                    "max_delay_ms must be a non-negative integer",
                )),
            },
            "factor" => match value.as_f64() {
                Some(f) => policy.factor = f,
                None => problems.push(Problem::at(path, "factor must be a number")),
            },
            _ => problems.push(Problem::at(
                path,
                format!(
                    "unknown field '{key}'; expected max_attempts, base_ms, factor, max_delay_ms"
                ),
            )),
        }
    }
    match policy.validate() {
        Ok(p) => p,
        Err(e) => {
            problems.push(Problem::at("/retry", e.to_string()));
            default
        }
    }
}

fn parse_op(i: usize, item: RawOp<'_>, problems: &mut Vec<Problem>) -> Option<ValidOp> {
    let RawOp::Fields(fields) = item else {
        problems.push(Problem::op(
            i,
            "",
            "each operation must be an object like {\"op\":\"pin\",\"cid\":\"…\"}",
        ));
        return None;
    };
    let before = problems.len();
    let op = match fields.op {
        Some(Field::Str(s)) => match s.parse::<Op>() {
            Ok(op) => Some(op),
            Err(_) => {
                problems.push(Problem::op(
                    i,
                    "op",
                    format!("unknown op '{}'; expected pin, unpin or replace", clip(&s)),
                ));
                None
            }
        },
        Some(Field::Null | Field::Other) => {
            problems.push(Problem::op(
                i,
                "op",
                "op must be a string: pin, unpin or replace",
            ));
            None
        }
        None => {
            problems.push(Problem::op(
                i,
                "op",
                "op is required: pin, unpin or replace",
            ));
            None
        }
    };
    let cid = parse_cid_field(i, "cid", fields.cid, true, problems);
    let replaces = parse_cid_field(
        i,
        "replaces",
        fields.replaces,
        op == Some(Op::Replace),
        problems,
    );
    if replaces.is_some() && op.is_some_and(|o| o != Op::Replace) {
        problems.push(Problem::op(
            i,
            "replaces",
            "replaces is only allowed with op 'replace'",
        ));
    }
    let name = match fields.name {
        None | Some(Field::Null) => None,
        Some(Field::Str(s)) if s.chars().count() > MAX_NAME_LEN => {
            problems.push(Problem::op(
                i,
                "name",
                format!("name is longer than {MAX_NAME_LEN} characters"),
            ));
            None
        }
        Some(Field::Str(s)) if s.contains('\0') => {
            problems.push(Problem::op(i, "name", format!("name {NUL}")));
            None
        }
        Some(Field::Str(s)) => Some(s.into_owned()),
        Some(Field::Other) => {
            problems.push(Problem::op(i, "name", "name must be a string"));
            None
        }
    };
    let meta = match fields.meta {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => {
            let size = serde_json::to_vec(&m)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if size > MAX_META_BYTES {
                problems.push(Problem::op(
                    i,
                    "meta",
                    format!("meta is larger than {MAX_META_BYTES} bytes"),
                ));
            }
            for path in nul_paths(&m, &format!("/ops/{i}/meta")) {
                problems.push(Problem {
                    index: Some(i),
                    ..Problem::at(path, format!("meta {NUL}, in keys or values"))
                });
            }
            m
        }
        Some(_) => {
            problems.push(Problem::op(i, "meta", "meta must be an object"));
            Map::new()
        }
    };
    for key in &fields.unknown {
        problems.push(Problem::op(
            i,
            key,
            format!("unknown field '{key}'; expected op, cid, replaces, name, meta"),
        ));
    }
    if problems.len() != before {
        return None;
    }
    Some(ValidOp {
        op: op?,
        cid: cid?,
        replaces,
        name,
        meta,
    })
}

fn parse_cid_field(
    i: usize,
    field: &str,
    value: Option<Field<'_>>,
    required: bool,
    problems: &mut Vec<Problem>,
) -> Option<PinCid> {
    match value {
        None | Some(Field::Null) => {
            if required {
                problems.push(Problem::op(i, field, format!("{field} is required")));
            }
            None
        }
        Some(Field::Str(s)) => match PinCid::parse(&s) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(Problem::op(i, field, format!("'{}': {e}", clip(&s))));
                None
            }
        },
        Some(Field::Other) => {
            problems.push(Problem::op(
                i,
                field,
                format!("{field} must be a string holding a CID"),
            ));
            None
        }
    }
}

/// Echoes at most 100 characters of client input back in an error message.
fn clip(s: &str) -> String {
    if s.chars().count() <= 100 {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(100).collect::<String>())
    }
}

// ---------------------------------------------------------------------------------------
// Reads

#[derive(Debug, Serialize)]
pub struct BatchView {
    pub id: Uuid,
    pub state: &'static str,
    pub priority: i16,
    pub backends: Vec<String>,
    pub retry: Value,
    pub jobs: i32,
    pub counts: StateCounts,
    pub created_at: DateTime<Utc>,
}

pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<BatchView>> {
    let id = parse_id(&id, "batch")?;
    let batch = db::get_batch(&state.pool, id, caller.owner_filter())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    let counts = db::batch_counts(&state.pool, id).await?;
    Ok(Json(BatchView {
        id,
        state: if counts.is_done() { "done" } else { "running" },
        priority: batch.priority,
        backends: batch.backends,
        retry: batch.retry.0,
        jobs: batch.job_count,
        counts,
        created_at: batch.created_at,
    }))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    let limit = page_limit(q.limit)?;
    let batches = db::list_batches(&state.pool, caller.owner_filter(), limit).await?;
    Ok(Json(serde_json::json!({ "batches": batches })))
}

#[derive(Debug, Deserialize)]
pub struct JobsQuery {
    limit: Option<i64>,
    /// Opaque cursor from the previous page's `next`.
    after: Option<String>,
    state: Option<String>,
}

pub async fn jobs(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    let id = parse_id(&id, "batch")?;
    db::get_batch(&state.pool, id, caller.owner_filter())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    let limit = page_limit(q.limit)?;
    let after = q.after.as_deref().map(parse_cursor).transpose()?;
    let job_state = q
        .state
        .as_deref()
        .map(|s| {
            s.parse::<JobState>().map_err(|_| {
                ApiError::invalid(
                    format!("unknown state '{s}'"),
                    vec![Problem::at(
                        "query:state",
                        "expected queued, running, retry_wait, succeeded, failed or cancelled",
                    )],
                )
            })
        })
        .transpose()?;
    let rows = db::batch_jobs(&state.pool, id, after, job_state, limit).await?;
    let next = if rows.len() as i64 == limit {
        rows.last().map(|j| format!("{}.{}", j.seq, j.id))
    } else {
        None
    };
    Ok(Json(serde_json::json!({ "jobs": rows, "next": next })))
}

/// `POST /v1/batches/{id}/cancel`: cancels every job of the batch that has not started and
/// asks workers to stop the running ones.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let id = parse_id(&id, "batch")?;
    db::get_batch(&state.pool, id, caller.owner_filter())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    let r = db::cancel_batch(&state.pool, id).await?;
    tracing::info!(batch_id = %id, cancelled = r.cancelled, stop_requested = r.requested, "batch cancelled");
    Ok((
        StatusCode::ACCEPTED,
        Json(
            serde_json::json!({"id": id, "cancelled": r.cancelled, "stop_requested": r.requested}),
        ),
    ))
}

/// `POST /v1/batches/{id}/retry-failed`: re-drives every failed job of the batch.
pub async fn retry_failed(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let id = parse_id(&id, "batch")?;
    db::get_batch(&state.pool, id, caller.owner_filter())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    let owed = db::redrive_failed(&state.pool, None, Some(id), caller.owner_filter()).await?;
    let n = owed.as_ref().map_or(0, |o| o.jobs.len());
    if let Some(owed) = owed {
        dispatch(&state, owed);
    }
    tracing::info!(batch_id = %id, jobs = n, "failed jobs re-driven");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"id": id, "requeued": n})),
    ))
}

fn parse_cursor(s: &str) -> ApiResult<(i32, Uuid)> {
    let bad = || {
        ApiError::invalid(
            "invalid cursor; pass the 'next' value of the previous page as 'after'",
            vec![Problem::at("query:after", "not a cursor")],
        )
    };
    let (seq, id) = s.split_once('.').ok_or_else(bad)?;
    Ok((
        seq.parse().map_err(|_| bad())?,
        id.parse().map_err(|_| bad())?,
    ))
}

pub(crate) fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(
            format!("limit must be from 1 to 1000, got {n}"),
            vec![Problem::at("query:limit", "out of range")],
        )),
    }
}

pub(crate) fn parse_id(s: &str, what: &str) -> ApiResult<Uuid> {
    s.parse()
        .map_err(|_| ApiError::NotFound(format!("no {what} {s}: ids are UUIDs")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V0: &str = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";

    fn parse(body: &str) -> ApiResult<BatchRequest> {
        parse_request(body.as_bytes(), 10, RetryPolicy::default())
    }

    fn problems(r: ApiResult<BatchRequest>) -> Vec<Problem> {
        match r {
            Err(ApiError::Invalid { details, .. }) => details,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_plain_batch_with_defaults() {
        let r = parse(&format!(
            r#"{{"ops":[{{"op":"pin","cid":"{V0}","name":"a"}}]}}"#
        ))
        .unwrap();
        assert_eq!(r.priority, Priority::DEFAULT);
        assert!(r.backends.is_empty());
        assert_eq!(r.ops.len(), 1);
        assert_eq!(r.ops[0].name.as_deref(), Some("a"));
    }

    #[test]
    fn names_every_bad_op_by_index() {
        let body = format!(
            r#"{{"priority":12,"ops":[
                {{"op":"pin","cid":"{V0}"}},
                {{"op":"pin","cid":"/ipfs/{V0}"}},
                {{"op":"frobnicate","cid":"{V0}"}},
                {{"op":"unpin","cid":"nope"}},
                {{"op":"pin"}},
                5
            ]}}"#
        );
        let p = problems(parse(&body));
        let indexed: Vec<(Option<usize>, &str)> =
            p.iter().map(|p| (p.index, p.path.as_str())).collect();
        assert!(indexed.contains(&(None, "/priority")));
        assert!(indexed.contains(&(Some(1), "/ops/1/cid")));
        assert!(indexed.contains(&(Some(2), "/ops/2/op")));
        assert!(indexed.contains(&(Some(3), "/ops/3/cid")));
        assert!(indexed.contains(&(Some(4), "/ops/4/cid")));
        assert!(indexed.contains(&(Some(5), "/ops/5")));
        assert!(!p.iter().any(|p| p.index == Some(0)));
    }

    #[test]
    fn too_many_ops_is_413() {
        let op = format!(r#"{{"op":"pin","cid":"{V0}"}}"#);
        let body = format!(r#"{{"ops":[{}]}}"#, vec![op; 11].join(","));
        assert!(matches!(parse(&body), Err(ApiError::PayloadTooLarge(_))));
    }

    #[test]
    fn malformed_json_says_where() {
        match parse(r#"{"ops": [ }"#) {
            Err(ApiError::Invalid { code, message, .. }) => {
                assert_eq!(code, "malformed_json");
                assert!(message.contains("line 1"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replace_needs_replaces() {
        let p = problems(parse(&format!(
            r#"{{"ops":[{{"op":"replace","cid":"{V0}"}}]}}"#
        )));
        assert_eq!(p[0].path, "/ops/0/replaces");
        let ok = parse(&format!(
            r#"{{"ops":[{{"op":"replace","cid":"{V0}","replaces":"{V0}"}}]}}"#
        ));
        assert!(ok.is_ok());
    }

    #[test]
    fn retry_policy_is_validated() {
        let p = problems(parse(&format!(
            r#"{{"retry":{{"max_attempts":0}},"ops":[{{"op":"pin","cid":"{V0}"}}]}}"#
        )));
        assert_eq!(p[0].path, "/retry");
        let r = parse(&format!(
            r#"{{"retry":{{"max_attempts":3,"base_ms":10,"max_delay_ms":100}},"ops":[{{"op":"pin","cid":"{V0}"}}]}}"#
        ))
        .unwrap();
        assert_eq!(r.retry.max_attempts, 3);
        assert_eq!(r.retry.base, Duration::from_millis(10));
    }

    #[test]
    fn escaped_strings_and_repeated_fields_read_as_json_says() {
        // `\u0062` is "b": a CID spelled with an escape is the same CID; a name with
        // escapes keeps them decoded; a field given twice keeps its last value.
        let cid = "bafybeihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
        let body = format!(
            r#"{{"priority":1,"priority":7,"ops":[{{"op":"unpin","op":"pin",
                "cid":"\u0062{}","name":"a\"b\n","meta":{{"k":[1,{{"x":null}}]}}}}]}}"#,
            &cid[1..]
        );
        let r = parse(&body).unwrap();
        assert_eq!(r.priority.get(), 7);
        assert_eq!(r.ops[0].op, Op::Pin);
        assert_eq!(r.ops[0].cid.to_string(), cid);
        assert_eq!(r.ops[0].name.as_deref(), Some("a\"b\n"));
        assert_eq!(
            Value::Object(r.ops[0].meta.clone()),
            serde_json::json!({"k": [1, {"x": null}]})
        );
    }

    #[test]
    fn every_wrong_shape_is_a_problem_at_its_path() {
        for body in ["[1, {\"ops\": []}]", "\"ops\"", "null", "3"] {
            assert_eq!(problems(parse(body))[0].path, "", "{body}");
        }
        for ops in ["{\"op\":\"pin\"}", "\"pin\"", "7"] {
            let p = problems(parse(&format!(r#"{{"ops":{ops}}}"#)));
            assert_eq!(p[0].path, "/ops", "{ops}");
            assert!(p[0].message.contains("must be an array"), "{ops}");
        }
        let p = problems(parse(r#"{"ops":null}"#));
        assert!(p[0].message.contains("required"), "{p:?}");
        // Fields of the wrong type; an unknown field holding nested values is skipped
        // whole, and the fields after it are still read.
        let body = format!(
            r#"{{"ops":[null, [1], {{"op":1,"cid":["{V0}"],"name":{{}},"meta":"x"}},
                {{"extra":{{"a":[1,{{"b":[]}}]}},"op":"pin","cid":"{V0}","name":false}},
                {{"op":null,"cid":"{V0}"}}]}}"#
        );
        let p = problems(parse(&body));
        let got: Vec<(&str, &str)> = p
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        for (path, says) in [
            ("/ops/0", "must be an object"),
            ("/ops/1", "must be an object"),
            ("/ops/2/op", "op must be a string"),
            ("/ops/2/cid", "cid must be a string"),
            ("/ops/2/name", "name must be a string"),
            ("/ops/2/meta", "meta must be an object"),
            ("/ops/3/extra", "unknown field 'extra'"),
            ("/ops/3/name", "name must be a string"),
            ("/ops/4/op", "op must be a string"),
        ] {
            assert!(
                got.iter().any(|(p, m)| *p == path && m.contains(says)),
                "{path}: {says} not in {got:?}"
            );
        }
        assert_eq!(got.len(), 9, "{got:?}");
    }

    #[test]
    fn json_that_is_not_kept_is_still_checked() {
        // A lone surrogate, a number out of range and nesting beyond serde_json's limit
        // are malformed JSON wherever they are: in an unknown field, in a field of the
        // wrong type, or in a field that a later copy of it replaces.
        let op = format!(r#"{{"op":"pin","cid":"{V0}"}}"#);
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let bodies = [
            format!(r#"{{"x":"\ud800","ops":[{op}]}}"#),
            format!(r#"{{"ops":[{{"op":"pin","cid":["\ud800"],"cid":"{V0}"}}]}}"#),
            format!(r#"{{"ops":{{"x":1e400}},"ops":[{op}]}}"#),
            format!(r#"{{"ops":[{{"op":"pin","name":[1e999],"name":null,"cid":"{V0}"}}]}}"#),
            r#"{"ops":[[1e400]]}"#.to_owned(),
            "[1e400]".to_owned(),
            format!(r#"{{"x":{deep},"ops":[{op}]}}"#),
        ];
        for body in &bodies {
            match parse(body) {
                Err(ApiError::Invalid { code, .. }) => {
                    assert_eq!(code, "malformed_json", "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // Bytes that are not UTF-8 in a skipped string, too.
        let mut raw = br#"{"x":"#.to_vec();
        raw.extend_from_slice(b"\"\xff\"");
        raw.extend_from_slice(format!(r#","ops":[{op}]}}"#).as_bytes());
        assert!(matches!(
            parse_request(&raw, 10, RetryPolicy::default()),
            Err(ApiError::Invalid {
                code: "malformed_json",
                ..
            })
        ));
    }

    #[test]
    fn nul_characters_are_problems_at_their_path() {
        let body = format!(
            r#"{{"ops":[
                {{"op":"pin","cid":"{V0}","name":"ok","meta":{{"k":"v"}}}},
                {{"op":"pin","cid":"{V0}","name":"a\u0000"}},
                {{"op":"pin","cid":"{V0}","meta":{{"k":"\u0000","j":["x","\u0000"]}}}},
                {{"op":"pin","cid":"{V0}","meta":{{"a/\u0000":{{"b":1}}}}}}
            ]}}"#
        );
        let p = problems(parse(&body));
        let got: Vec<(Option<usize>, &str)> =
            p.iter().map(|p| (p.index, p.path.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(1), "/ops/1/name"),
                (Some(2), "/ops/2/meta/j/1"),
                (Some(2), "/ops/2/meta/k"),
                (Some(3), "/ops/3/meta/a~1\u{0}"),
            ]
        );
        assert!(p.iter().all(|p| p.message.contains("NUL")), "{p:?}");
    }

    #[test]
    fn unknown_fields_are_reported() {
        let p = problems(parse(&format!(
            r#"{{"prio":1,"ops":[{{"op":"pin","cid":"{V0}","nmae":"x"}}]}}"#
        )));
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"/prio"));
        assert!(paths.contains(&"/ops/0/nmae"));
    }
}
