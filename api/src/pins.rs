//! The IPFS Pinning Service API 1.0.0 at `/pins` (spec: `api/openapi/pinning-service-api.yaml`).
//!
//! Requests, responses and errors follow the spec to the letter: `Pin` in, `PinStatus` /
//! `PinResults` out, every error a `Failure` (`{"error":{"reason","details"}}`). Pins are
//! scoped to the caller's tenant (another tenant's requestid is 404); an admin token sees
//! every tenant's. Storage and status derivation live in `pinq_core::psa`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use pinq_core::cid::PinCid;
use pinq_core::db::{self, Backend};
use pinq_core::kubo::KuboClient;
use pinq_core::model::Priority;
use pinq_core::psa::{self, JobSettings, ListFilter, NewPin, PinRequestRow, PinStatus, TextMatch};
use serde_json::{Map, Value, json};
use tokio::sync::RwLock;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{UNSTORABLE, unstorable_input};
use crate::input::{NUL, PsaPath, nul_paths};

/// The PSA settings the handlers need.
#[derive(Debug, Clone)]
pub struct PsaConfig {
    /// Placement: backend names; empty means every enabled backend.
    pub backends: Vec<String>,
    pub priority: Priority,
    pub swarm_port: u16,
    /// The operator's delegates (`PINQ_PSA_DELEGATES`): when any, every pin request names
    /// these, and no backend is asked for its addresses.
    pub delegates: Vec<String>,
}

/// Backend node identities (peer id and reported addresses), cached for a while so a
/// listing does not call nodes.
#[derive(Default)]
pub struct PeerCache {
    entries: RwLock<HashMap<Uuid, PeerEntry>>,
}

/// When a node's identity was learnt, its peer id, and the addresses it reported.
type PeerEntry = (Instant, String, Vec<String>);

const PEER_TTL: Duration = Duration::from_secs(300);
const ID_TIMEOUT: Duration = Duration::from_secs(2);

/// A response for a failed request, in the spec's `Failure` shape.
#[derive(Debug)]
pub struct PsaError {
    status: StatusCode,
    reason: &'static str,
    details: String,
}

impl PsaError {
    pub fn new(status: StatusCode, reason: &'static str, details: impl Into<String>) -> Self {
        PsaError {
            status,
            reason,
            details: details.into(),
        }
    }
    pub fn bad_request(details: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", details)
    }
    pub fn unauthorized(details: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", details)
    }
    pub fn not_found(details: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", details)
    }
    fn internal(details: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_SERVER_ERROR",
            details,
        )
    }
}

impl From<sqlx::Error> for PsaError {
    fn from(e: sqlx::Error) -> Self {
        if unstorable_input(&e) {
            tracing::warn!(error = %e, "the database refused a value of the request; check it where it is read");
            PsaError::bad_request(UNSTORABLE)
        } else if db::is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            PsaError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVICE_UNAVAILABLE",
                "the database is unreachable; retry in a few seconds",
            )
        } else {
            tracing::error!(error = %e, "database query failed");
            PsaError::internal("internal error; the server log has the details")
        }
    }
}

impl IntoResponse for PsaError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": {"reason": self.reason, "details": self.details}})),
        )
            .into_response();
        let h = resp.headers_mut();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                h.insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                h.insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("5"),
                );
            }
            _ => {}
        }
        resp
    }
}

type PsaResult<T> = Result<T, PsaError>;

// ---------------------------------------------------------------------------------------
// Input

fn read_body(body: Result<Bytes, BytesRejection>) -> PsaResult<Value> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            PsaError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "request body is larger than the server accepts",
            )
        } else {
            PsaError::bad_request(format!("could not read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        PsaError::bad_request(format!(
            "request body is not valid JSON: {e}; send a Pin object like {{\"cid\":\"bafy…\"}}"
        ))
    })
}

/// Parses a `Pin` object.
pub(crate) fn parse_pin(v: &Value, owner: &str) -> PsaResult<NewPin> {
    let Value::Object(obj) = v else {
        return Err(PsaError::bad_request(
            "request body must be a Pin object like {\"cid\":\"bafy…\"}",
        ));
    };
    let (sent, cid) = match obj.get("cid") {
        Some(Value::String(s)) => (
            s,
            PinCid::parse(s)
                .map_err(|e| PsaError::bad_request(format!("cid '{}': {e}", clip(s))))?,
        ),
        None | Some(Value::Null) => return Err(PsaError::bad_request("cid is required")),
        Some(_) => return Err(PsaError::bad_request("cid must be a string holding a CID")),
    };
    let name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() > psa::MAX_NAME_LEN => {
            return Err(PsaError::bad_request(format!(
                "name is longer than {} characters",
                psa::MAX_NAME_LEN
            )));
        }
        Some(Value::String(s)) if s.contains('\0') => {
            return Err(PsaError::bad_request(format!("name {NUL}")));
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(PsaError::bad_request("name must be a string")),
    };
    let origins = match obj.get("origins") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(items)) => {
            if items.len() > psa::MAX_ORIGINS {
                return Err(PsaError::bad_request(format!(
                    "origins holds at most {} multiaddrs",
                    psa::MAX_ORIGINS
                )));
            }
            let mut out: Vec<String> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Some(s) = item
                    .as_str()
                    .filter(|s| s.starts_with('/') && s.len() <= 1024)
                else {
                    return Err(PsaError::bad_request(format!(
                        "origins[{i}] must be a multiaddr string like /ip4/1.2.3.4/tcp/4001/p2p/<peer id>"
                    )));
                };
                if s.contains('\0') {
                    return Err(PsaError::bad_request(format!("origins[{i}] {NUL}")));
                }
                if out.iter().any(|o| o == s) {
                    return Err(PsaError::bad_request(format!(
                        "origins[{i}] repeats '{}'; origins must be unique",
                        clip(s)
                    )));
                }
                out.push(s.to_owned());
            }
            out
        }
        Some(_) => {
            return Err(PsaError::bad_request(
                "origins must be an array of multiaddr strings",
            ));
        }
    };
    let meta = match obj.get("meta") {
        None | Some(Value::Null) => Map::new(),
        Some(v) => parse_meta("meta", v)?,
    };
    Ok(NewPin {
        owner: owner.to_owned(),
        // As the client sent it: `pin.cid` gives it back unchanged (the CID parsed, so
        // the string is a CID in one of its spellings).
        cid: sent.clone(),
        cid_canonical: cid.canonical(),
        name,
        origins,
        meta,
    })
}

/// A `meta` object (the pin's, or the list's filter), refusing NUL characters in its
/// keys and values.
fn parse_meta(what: &str, v: &Value) -> PsaResult<Map<String, Value>> {
    let meta = psa::parse_meta(v).map_err(PsaError::bad_request)?;
    match nul_paths(&meta, "").first() {
        Some(at) => Err(PsaError::bad_request(format!(
            "{what} {NUL}; the key or value at {at} does"
        ))),
        None => Ok(meta),
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

/// An RFC 3339 time. Its years have four digits (0000–9999), all of which PostgreSQL
/// stores, so no range check is needed here (unlike the v1 routes' looser parsers).
fn parse_time(key: &str, v: &str) -> PsaResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            PsaError::bad_request(format!(
                "{key} must be an RFC 3339 timestamp like 2020-07-27T17:32:28.276Z, got '{}': {e}",
                clip(v)
            ))
        })
}

/// Parses the query of `GET /pins` (for everything but the owner).
pub(crate) fn parse_list_query(pairs: &[(String, String)]) -> PsaResult<ListFilter> {
    let mut f = ListFilter {
        limit: psa::DEFAULT_LIMIT,
        ..ListFilter::default()
    };
    let mut cids: Option<Vec<String>> = None;
    let mut statuses: Option<Vec<PinStatus>> = None;
    let mut name: Option<String> = None;
    let mut mode: Option<TextMatch> = None;
    for (key, value) in pairs {
        match key.as_str() {
            // `cid=a,b` (the spec's form) and `cid=a&cid=b` are both accepted.
            "cid" => {
                let list = cids.get_or_insert_with(Vec::new);
                for c in value.split(',').map(str::trim) {
                    let parsed = PinCid::parse(c).map_err(|e| {
                        PsaError::bad_request(format!("cid filter '{}': {e}", clip(c)))
                    })?;
                    let canonical = parsed.canonical();
                    if !list.contains(&canonical) {
                        list.push(canonical);
                    }
                }
            }
            "name" => {
                if value.chars().count() > psa::MAX_NAME_LEN {
                    return Err(PsaError::bad_request(format!(
                        "name filter is longer than {} characters",
                        psa::MAX_NAME_LEN
                    )));
                }
                if value.contains('\0') {
                    return Err(PsaError::bad_request(format!("name filter {NUL}")));
                }
                name = Some(value.clone());
            }
            "match" => {
                mode = Some(value.parse().map_err(|_| {
                    PsaError::bad_request(format!(
                        "match '{}' is unknown; use exact, iexact, partial or ipartial",
                        clip(value)
                    ))
                })?);
            }
            "status" => {
                let list = statuses.get_or_insert_with(Vec::new);
                for s in value.split(',').map(str::trim) {
                    let st: PinStatus = s.parse().map_err(|_| {
                        PsaError::bad_request(format!(
                            "status '{}' is unknown; use queued, pinning, pinned or failed (comma-separated)",
                            clip(s)
                        ))
                    })?;
                    if !list.contains(&st) {
                        list.push(st);
                    }
                }
            }
            "before" => f.before = Some(parse_time("before", value)?),
            "after" => f.after = Some(parse_time("after", value)?),
            "limit" => {
                f.limit = value
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=psa::MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        PsaError::bad_request(format!(
                            "limit must be an integer from 1 to {}, got '{}'",
                            psa::MAX_LIMIT,
                            clip(value)
                        ))
                    })?;
            }
            "meta" => {
                let v: Value = serde_json::from_str(value).map_err(|e| {
                    PsaError::bad_request(format!(
                        "meta must be a URL-encoded JSON object like {{\"app_id\":\"…\"}}: {e}"
                    ))
                })?;
                f.meta = Some(parse_meta("meta filter", &v)?);
            }
            // Parameters the spec does not define are ignored, as clients may add their own.
            _ => {}
        }
    }
    if let Some(list) = &cids
        && (list.is_empty() || list.len() > psa::MAX_CID_FILTER)
    {
        return Err(PsaError::bad_request(format!(
            "the cid filter takes 1 to {} CIDs, got {}",
            psa::MAX_CID_FILTER,
            list.len()
        )));
    }
    // `match` applies to the name filter only; alone it changes nothing.
    f.cids = cids;
    f.name = name.map(|n| (n, mode.unwrap_or_default()));
    f.statuses = statuses.unwrap_or_else(|| vec![PinStatus::Pinned]);
    Ok(f)
}

fn parse_requestid(s: &str) -> PsaResult<Uuid> {
    s.parse::<Uuid>()
        .map_err(|_| PsaError::not_found(format!("no pin request '{}'", clip(s))))
}

// ---------------------------------------------------------------------------------------
// Output

fn status_json(row: &PinRequestRow, delegates: Vec<String>) -> Value {
    let mut pin = Map::new();
    pin.insert("cid".into(), json!(row.cid));
    if let Some(name) = &row.name {
        pin.insert("name".into(), json!(name));
    }
    pin.insert("origins".into(), json!(row.origins));
    pin.insert("meta".into(), row.meta.0.clone());
    let mut info = Map::new();
    if row.status != PinStatus::Pinned.as_str()
        && let Some(d) = &row.status_details
    {
        info.insert("status_details".into(), json!(d));
    }
    json!({
        "requestid": row.id.to_string(),
        "status": row.status,
        "created": psa::format_created(row.created),
        "pin": pin,
        "delegates": delegates,
        "info": info,
    })
}

impl PeerCache {
    /// The delegates of each named backend.
    async fn delegates(
        &self,
        state: &AppState,
        names: &[String],
    ) -> PsaResult<HashMap<String, Vec<String>>> {
        let backends: Vec<Backend> = db::backends_by_name(&state.pool, names).await?;
        let mut out = HashMap::new();
        let mut missing: Vec<&Backend> = Vec::new();
        {
            let entries = self.entries.read().await;
            for b in &backends {
                match entries.get(&b.id) {
                    Some((at, id, addrs)) if at.elapsed() < PEER_TTL => {
                        out.insert(
                            b.name.clone(),
                            psa::delegates_of(&b.url, state.psa.swarm_port, id, addrs),
                        );
                    }
                    _ => missing.push(b),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        // Ask the node (`id`), briefly; else use the peer id the health probes recorded.
        let probed: HashMap<Uuid, String> = psa::probed_peer_ids(&state.pool)
            .await?
            .into_iter()
            .collect();
        for b in missing {
            let client = KuboClient::new(state.http.clone(), &b.url);
            let live = tokio::time::timeout(ID_TIMEOUT, client.id()).await;
            let found = match live {
                Ok(Ok(node)) => Some((node.id, node.addresses.unwrap_or_default())),
                _ => probed.get(&b.id).map(|id| (id.clone(), vec![])),
            };
            match found {
                Some((id, addrs)) => {
                    out.insert(
                        b.name.clone(),
                        psa::delegates_of(&b.url, state.psa.swarm_port, &id, &addrs),
                    );
                    self.entries
                        .write()
                        .await
                        .insert(b.id, (Instant::now(), id, addrs));
                }
                None => {
                    tracing::warn!(backend = %b.name, "no peer id known for backend; it is left out of delegates (PINQ_PSA_DELEGATES names them instead)");
                }
            }
        }
        Ok(out)
    }
}

/// Renders rows, computing delegates once per backend (or naming the operator's).
async fn render(state: &AppState, rows: &[PinRequestRow]) -> PsaResult<Vec<Value>> {
    if !state.psa.delegates.is_empty() {
        return Ok(rows
            .iter()
            .map(|r| status_json(r, state.psa.delegates.clone()))
            .collect());
    }
    let mut names: Vec<String> = rows.iter().flat_map(|r| r.backends.clone()).collect();
    names.sort();
    names.dedup();
    let by_backend = state.peers.delegates(state, &names).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut d: Vec<String> = Vec::new();
            for b in &r.backends {
                for a in by_backend.get(b).into_iter().flatten() {
                    if !d.contains(a) && d.len() < psa::MAX_ORIGINS {
                        d.push(a.clone());
                    }
                }
            }
            status_json(r, d)
        })
        .collect())
}

async fn render_one(state: &AppState, row: &PinRequestRow) -> PsaResult<Value> {
    render(state, std::slice::from_ref(row))
        .await?
        .pop()
        .ok_or_else(|| PsaError::internal("internal error; the server log has the details"))
}

// ---------------------------------------------------------------------------------------
// Handlers

fn settings(state: &AppState) -> JobSettings {
    JobSettings {
        priority: state.psa.priority,
        retry: state.default_retry,
    }
}

/// The backends a new PSA pin is placed on.
async fn placement(state: &AppState) -> PsaResult<Vec<Backend>> {
    if state.psa.backends.is_empty() {
        let all: Vec<Backend> = db::list_backends(&state.pool)
            .await?
            .into_iter()
            .filter(|b| b.enabled)
            .collect();
        if all.is_empty() {
            return Err(PsaError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "NO_BACKEND",
                "the service has no IPFS backend to pin on yet; try again later",
            ));
        }
        return Ok(all);
    }
    let found = db::backends_by_name(&state.pool, &state.psa.backends).await?;
    if found.len() != state.psa.backends.len() {
        tracing::error!(configured = ?state.psa.backends, "PINQ_PSA_BACKENDS names unknown backends");
        return Err(PsaError::internal(
            "the service's pin placement names a backend that does not exist; the operator must fix PINQ_PSA_BACKENDS",
        ));
    }
    Ok(state
        .psa
        .backends
        .iter()
        .filter_map(|n| found.iter().find(|b| &b.name == n).cloned())
        .collect())
}

/// Most pin requests whose origins are being connected to at once (each tries every
/// origin on every backend, up to 5 s a try); a request beyond them skips the connects.
pub(crate) const MAX_ORIGIN_CONNECTS: usize = 8;

/// Best effort: asks the backends to connect to the pin's origins, in the background.
fn connect_origins(state: &AppState, backends: Vec<Backend>, origins: Vec<String>) {
    if origins.is_empty() {
        return;
    }
    let Ok(room) = state.origin_connects.clone().try_acquire_owned() else {
        tracing::debug!("too many origin connects under way; skipping this request's");
        return;
    };
    let http = state.http.clone();
    tokio::spawn(async move {
        let _room = room;
        for b in backends {
            let errors =
                psa::connect_origins(&http, &b.url, &origins, Duration::from_secs(5)).await;
            if !errors.is_empty() {
                tracing::debug!(backend = %b.name, ?errors, "could not connect to some origins");
            }
        }
    });
}

/// `POST /pins`: 202 and a `queued` PinStatus; the pin runs as a job.
pub async fn add(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> PsaResult<(StatusCode, Json<Value>)> {
    let pin = parse_pin(&read_body(body)?, &caller.owner)?;
    let backends = placement(&state).await?;
    let (row, jobs) = psa::add_request(&state.pool, &pin, &backends, settings(&state)).await?;
    tracing::info!(requestid = %row.id, cid = %row.cid, owner = %row.owner, "pin request accepted");
    crate::batches::dispatch(&state, jobs);
    connect_origins(&state, backends, pin.origins);
    Ok((StatusCode::ACCEPTED, Json(render_one(&state, &row).await?)))
}

/// `GET /pins`: newest first, filtered; `count` is the number of all matches.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> PsaResult<Json<Value>> {
    let Query(pairs) = query
        .map_err(|e| PsaError::bad_request(format!("could not read the query string: {e}")))?;
    let mut filter = parse_list_query(&pairs)?;
    filter.owner = caller.owner_filter().map(str::to_owned);
    let (count, rows) = psa::list_requests(&state.pool, &filter).await?;
    let results = render(&state, &rows).await?;
    Ok(Json(json!({"count": count, "results": results})))
}

/// `GET /pins/{requestid}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    PsaPath(id): PsaPath<String>,
) -> PsaResult<Json<Value>> {
    let id = parse_requestid(&id)?;
    let row = psa::get_request(&state.pool, id, caller.owner_filter())
        .await?
        .ok_or_else(|| PsaError::not_found(format!("no pin request {id}")))?;
    Ok(Json(render_one(&state, &row).await?))
}

/// `POST /pins/{requestid}`: replaces the request with a new one (new requestid); the new
/// CID is pinned before the old one is unpinned.
pub async fn replace(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    PsaPath(id): PsaPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> PsaResult<(StatusCode, Json<Value>)> {
    let id = parse_requestid(&id)?;
    let pin = parse_pin(&read_body(body)?, &caller.owner)?;
    let origins = pin.origins.clone();
    match psa::replace_request(
        &state.pool,
        id,
        caller.owner_filter(),
        pin,
        settings(&state),
    )
    .await?
    {
        psa::Replaced::NotFound => Err(PsaError::not_found(format!("no pin request {id}"))),
        psa::Replaced::NoBackend => Err(PsaError::new(
            StatusCode::CONFLICT,
            "BACKEND_GONE",
            "the backends holding this pin were removed; delete it and add a new pin instead",
        )),
        psa::Replaced::Done(row, jobs) => {
            tracing::info!(requestid = %row.id, replaces = %id, cid = %row.cid, "pin request replaced");
            crate::batches::dispatch(&state, jobs);
            let backends = db::backends_by_name(&state.pool, &row.backends).await?;
            connect_origins(&state, backends, origins);
            Ok((StatusCode::ACCEPTED, Json(render_one(&state, &row).await?)))
        }
    }
}

/// `DELETE /pins/{requestid}`: 202; the CID is unpinned by a job unless another live
/// request holds it.
pub async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    PsaPath(id): PsaPath<String>,
) -> PsaResult<StatusCode> {
    let id = parse_requestid(&id)?;
    let owed = psa::delete_request(&state.pool, id, caller.owner_filter(), settings(&state))
        .await?
        .ok_or_else(|| PsaError::not_found(format!("no pin request {id}")))?;
    let unpin_jobs = owed.as_ref().map_or(0, |o| o.jobs.len());
    tracing::info!(requestid = %id, unpin_jobs, "pin request deleted");
    if let Some(owed) = owed {
        crate::batches::dispatch(&state, owed);
    }
    Ok(StatusCode::ACCEPTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> PsaResult<ListFilter> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse_list_query(&v)
    }

    const V0: &str = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";

    #[test]
    fn list_defaults() {
        let f = q(&[]).unwrap();
        assert_eq!(f.limit, 10);
        assert_eq!(f.statuses, vec![PinStatus::Pinned]);
        assert!(f.cids.is_none() && f.name.is_none() && f.meta.is_none());
    }

    #[test]
    fn list_limits() {
        assert!(q(&[("limit", "0")]).is_err());
        assert!(q(&[("limit", "1001")]).is_err());
        assert!(q(&[("limit", "x")]).is_err());
        assert_eq!(q(&[("limit", "1000")]).unwrap().limit, 1000);
        let eleven = [V0; 11].join(",");
        assert!(q(&[("cid", &eleven)]).is_ok(), "duplicates collapse to one");
        assert!(q(&[("cid", "")]).is_err());
        assert!(q(&[("cid", "nope")]).is_err());
        assert!(q(&[("name", &"n".repeat(256))]).is_err());
        assert!(q(&[("name", &"n".repeat(255))]).is_ok());
    }

    #[test]
    fn list_filters() {
        let f = q(&[
            ("status", "queued,pinning"),
            ("status", "failed"),
            ("name", "Abc"),
            ("match", "ipartial"),
            ("meta", r#"{"app":"x"}"#),
            ("before", "2020-07-27T17:32:28.276Z"),
        ])
        .unwrap();
        assert_eq!(
            f.statuses,
            vec![PinStatus::Queued, PinStatus::Pinning, PinStatus::Failed]
        );
        assert_eq!(f.name, Some(("Abc".into(), TextMatch::IPartial)));
        assert_eq!(f.meta.unwrap()["app"], "x");
        assert!(f.before.is_some());
        assert!(q(&[("status", "done")]).is_err());
        assert!(q(&[("match", "fuzzy")]).is_err());
        assert!(q(&[("meta", r#"{"n":1}"#)]).is_err());
        assert!(q(&[("meta", "not json")]).is_err());
        assert!(q(&[("before", "yesterday")]).is_err());
    }

    #[test]
    fn pins_parse() {
        let p = parse_pin(&json!({"cid": V0, "name": "n", "meta": {"a": "b"}}), "t").unwrap();
        assert_eq!(p.cid, V0);
        assert_eq!(p.owner, "t");
        assert!(parse_pin(&json!({}), "t").is_err());
        assert!(parse_pin(&json!({"cid": "x/ipfs"}), "t").is_err());
        assert!(parse_pin(&json!({"cid": V0, "name": "n".repeat(256)}), "t").is_err());
        assert!(parse_pin(&json!({"cid": V0, "meta": {"a": 1}}), "t").is_err());
        assert!(parse_pin(&json!({"cid": V0, "origins": ["nope"]}), "t").is_err());
        assert!(
            parse_pin(
                &json!({"cid": V0, "origins": ["/ip4/1.2.3.4", "/ip4/1.2.3.4"]}),
                "t"
            )
            .is_err()
        );
        assert!(parse_pin(&json!([V0]), "t").is_err());
    }

    fn details(r: PsaResult<impl std::fmt::Debug>) -> String {
        match r {
            Err(e) => {
                assert_eq!(e.status, StatusCode::BAD_REQUEST, "{e:?}");
                e.details
            }
            Ok(v) => panic!("accepted: {v:?}"),
        }
    }

    #[test]
    fn nul_characters_are_refused_naming_the_field() {
        let pin = |v: Value| details(parse_pin(&v, "t").map(|p| p.name));
        for (body, says) in [
            (
                json!({"cid": V0, "name": "a\u{0}"}),
                "name must not contain the NUL",
            ),
            (
                json!({"cid": V0, "origins": ["/ip4/1.2.3.4", "/ip4/\u{0}"]}),
                "origins[1] must not contain the NUL",
            ),
            (json!({"cid": V0, "meta": {"app": "\u{0}"}}), "at /app"),
            (
                json!({"cid": V0, "meta": {"a\u{0}": "x"}}),
                "meta must not contain the NUL",
            ),
        ] {
            let d = pin(body.clone());
            assert!(d.contains(says), "{body}: {d}");
        }
        let query = |k: &str, v: &str| details(q(&[(k, v)]).map(|f| f.limit));
        assert!(query("name", "\u{0}").contains("name filter must not contain the NUL"));
        assert!(query("meta", r#"{"app":"\u0000"}"#).contains("meta filter must not"));
        assert!(query("meta", r#"{"\u0000":"x"}"#).contains("meta filter must not"));
    }

    /// `pin.cid` is given back as the client spelled it; the canonical form keys it.
    #[test]
    fn the_cid_is_kept_as_sent() {
        let base58 = "zb2rhYh8njxEvhKEdLxHparz3SPqHP9ssDYKuN2Fxtrcv6MMo";
        let pin = parse_pin(&json!({ "cid": base58 }), "t").expect("a valid pin");
        assert_eq!(pin.cid, base58);
        assert_eq!(
            pin.cid_canonical,
            PinCid::parse(base58).expect("CID").canonical()
        );
        assert!(
            pin.cid_canonical.starts_with("bafk"),
            "{}",
            pin.cid_canonical
        );
    }
}
