//! The Pinning Service API's pin requests: their statuses, list filters, delegates, and
//! the queries that store them next to the batch and jobs that carry them out.
//!
//! A pin request is backed by a batch of one operation fanned out to the placement
//! backends: `pin` for `POST /pins`, `replace` (pin the new CID, then unpin the old) for
//! `POST /pins/{requestid}`, and `DELETE` adds an `unpin` batch. Its status is derived from
//! the jobs (see the `psa_status_of_batch` SQL function). Pins are reference counted: an
//! owner's live requests for a CID on a backend make one reference of that owner, and
//! deleting or replacing a request removes it only when no other live request of the same
//! owner holds the CID there. The unpin job then removes that owner's reference from the
//! pin index, and the node unpins only when no owner (through this API or `/v1/batches`)
//! holds one. Writes for one CID serialise on a transaction-scoped advisory lock, so a
//! concurrent add is always seen by a delete.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use sqlx::{FromRow, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::cid::key_of;
use crate::db::{self, Backend};
use crate::model::{Op, Priority, UnknownVariant};
use crate::retry::RetryPolicy;

/// Most CIDs in the `cid` filter.
pub const MAX_CID_FILTER: usize = 10;
/// Bounds and default of `limit`.
pub const MAX_LIMIT: i64 = 1000;
pub const DEFAULT_LIMIT: i64 = 10;
pub const MAX_NAME_LEN: usize = 255;
/// Most entries of `origins` (and of `delegates`).
pub const MAX_ORIGINS: usize = 20;
/// Most keys of `meta`.
pub const MAX_META_KEYS: usize = 1000;

/// A pin request's status as the spec names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinStatus {
    Queued,
    Pinning,
    Pinned,
    Failed,
}

impl PinStatus {
    pub const ALL: [PinStatus; 4] = [
        PinStatus::Queued,
        PinStatus::Pinning,
        PinStatus::Pinned,
        PinStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PinStatus::Queued => "queued",
            PinStatus::Pinning => "pinning",
            PinStatus::Pinned => "pinned",
            PinStatus::Failed => "failed",
        }
    }
}

impl FromStr for PinStatus {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PinStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownVariant(s.to_owned()))
    }
}

impl fmt::Display for PinStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `match` strategy of the `name` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextMatch {
    #[default]
    Exact,
    IExact,
    Partial,
    IPartial,
}

impl TextMatch {
    pub fn as_str(self) -> &'static str {
        match self {
            TextMatch::Exact => "exact",
            TextMatch::IExact => "iexact",
            TextMatch::Partial => "partial",
            TextMatch::IPartial => "ipartial",
        }
    }

    /// The same rule as the SQL of [`list_requests`], for unit tests and documentation.
    pub fn matches(self, name: &str, pattern: &str) -> bool {
        match self {
            TextMatch::Exact => name == pattern,
            TextMatch::IExact => name.to_lowercase() == pattern.to_lowercase(),
            TextMatch::Partial => name.contains(pattern),
            TextMatch::IPartial => name.to_lowercase().contains(&pattern.to_lowercase()),
        }
    }
}

impl FromStr for TextMatch {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            TextMatch::Exact,
            TextMatch::IExact,
            TextMatch::Partial,
            TextMatch::IPartial,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| UnknownVariant(s.to_owned()))
    }
}

/// Parses the `meta` of a pin or of the `meta` filter: a JSON object whose values are all
/// strings. The error says what is wrong, for the client.
pub fn parse_meta(v: &Value) -> Result<Map<String, Value>, String> {
    let Value::Object(m) = v else {
        return Err("meta must be a JSON object of string values".into());
    };
    if m.len() > MAX_META_KEYS {
        return Err(format!("meta has more than {MAX_META_KEYS} keys"));
    }
    if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
        return Err(format!("meta values must be strings; '{k}' is not"));
    }
    Ok(m.clone())
}

/// A `created` timestamp as the API writes it: RFC 3339, UTC, microseconds (the
/// database's precision), so a value read back as `before` selects exactly.
pub fn format_created(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The operator's `delegates` (`PINQ_PSA_DELEGATES`), checked: each a multiaddr (starting
/// with `/`, no spaces) whose last part names the peer (`/p2p/<peer id>`), none listed
/// twice, at most [`MAX_ORIGINS`] (the spec's bounds). Empty entries are skipped. The
/// error says which entry is wrong and why.
pub fn configured_delegates(list: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for entry in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let peer = entry
            .rsplit_once("/p2p/")
            .map(|(_, id)| id)
            .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()));
        if !entry.starts_with('/') || entry.contains(char::is_whitespace) || peer.is_none() {
            return Err(format!(
                "'{entry}' is not a multiaddr that ends in /p2p/<peer id>, such as /ip4/203.0.113.1/tcp/4001/p2p/12D3KooW…"
            ));
        }
        if out.iter().any(|d| d == entry) {
            return Err(format!("'{entry}' is listed twice"));
        }
        out.push(entry.to_owned());
    }
    if out.len() > MAX_ORIGINS {
        return Err(format!(
            "{} addresses are listed; a pin request names at most {MAX_ORIGINS}",
            out.len()
        ));
    }
    Ok(out)
}

/// The delegate multiaddr of a backend: `/ip4|ip6|dns4/<host>/tcp/<port>/p2p/<peer id>`,
/// from the host of its RPC URL. Used because a node may report no address of its own
/// (js-ipfs offline answers `Addresses: []`).
pub fn delegate_from_url(url: &str, swarm_port: u16, peer_id: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        authority.split(':').next()?
    };
    if host.is_empty() || peer_id.is_empty() {
        return None;
    }
    let proto = if host.parse::<std::net::Ipv4Addr>().is_ok() {
        "ip4"
    } else if host.parse::<std::net::Ipv6Addr>().is_ok() {
        "ip6"
    } else {
        "dns4"
    };
    Some(format!("/{proto}/{host}/tcp/{swarm_port}/p2p/{peer_id}"))
}

/// The delegates of a backend: the addresses its node reports (those that end in
/// `/p2p/<id>`, or get it appended), else the one built from its URL.
pub fn delegates_of(url: &str, swarm_port: u16, peer_id: &str, reported: &[String]) -> Vec<String> {
    let suffix = format!("/p2p/{peer_id}");
    let mut out: Vec<String> = Vec::new();
    for a in reported {
        let a = a.trim();
        if !a.starts_with('/') || a.contains("/p2p-circuit") {
            continue;
        }
        let full = if a.ends_with(&suffix) {
            a.to_owned()
        } else if a.contains("/p2p/") {
            continue;
        } else {
            format!("{a}{suffix}")
        };
        if !out.contains(&full) {
            out.push(full);
        }
    }
    if out.is_empty()
        && let Some(d) = delegate_from_url(url, swarm_port, peer_id)
    {
        out.push(d);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Storage

/// A pin request with its derived status.
#[derive(Debug, Clone, FromRow)]
pub struct PinRequestRow {
    pub id: Uuid,
    pub owner: String,
    pub cid: String,
    pub name: Option<String>,
    pub origins: Vec<String>,
    pub meta: sqlx::types::Json<Value>,
    pub created: DateTime<Utc>,
    pub batch_id: Uuid,
    pub backends: Vec<String>,
    pub status: String,
    pub status_details: Option<String>,
}

const ROW_SELECT: &str = "p.id, p.owner, p.cid, p.name, p.origins, p.meta, p.created, p.batch_id,
    p.backends,
    coalesce(psa_status_of_batch(p.batch_id),
             CASE WHEN EXISTS (SELECT 1 FROM pins x JOIN backends b ON b.id = x.backend_id
                               WHERE x.cid = p.cid_canonical AND x.status = 'pinned'
                                 AND b.name = ANY (p.backends)
                                 AND (x.owner = p.owner OR p.owner = ANY (x.others)))
                  THEN 'pinned' ELSE 'failed' END) AS status,
    (SELECT j.last_error FROM jobs j
     WHERE j.batch_id = p.batch_id AND j.last_error IS NOT NULL
     ORDER BY j.updated_at DESC LIMIT 1) AS status_details";

/// What a new request pins, and where.
#[derive(Debug, Clone)]
pub struct NewPin {
    pub owner: String,
    /// The CID as the client sent it, and its canonical form.
    pub cid: String,
    pub cid_canonical: String,
    pub name: Option<String>,
    pub origins: Vec<String>,
    pub meta: Map<String, Value>,
}

/// How jobs of a request's batch run.
#[derive(Debug, Clone, Copy)]
pub struct JobSettings {
    pub priority: Priority,
    pub retry: RetryPolicy,
}

/// Jobs committed and owed to the broker, for the caller to publish.
pub type Dispatch = db::Owed;

async fn lock_cid(tx: &mut Transaction<'_, Postgres>, canonical: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('pinq-psa:' || $1, 0))")
        .bind(canonical)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// One job of a batch being written.
struct JobSpec<'a> {
    backend: &'a Backend,
    op: Op,
    cid: &'a str,
    replaces: Option<&'a str>,
}

/// Writes a batch of one operation (seq 0) with one job per spec.
async fn insert_batch_tx(
    tx: &mut Transaction<'_, Postgres>,
    owner: &str,
    settings: JobSettings,
    jobs: &[JobSpec<'_>],
    name: Option<&str>,
    meta: &Map<String, Value>,
) -> Result<(Uuid, Dispatch), sqlx::Error> {
    let batch_id = Uuid::now_v7();
    let retry = settings.retry;
    let retry_json = serde_json::json!({
        "max_attempts": retry.max_attempts,
        "base_ms": retry.base.as_millis() as u64,
        "factor": retry.factor,
        "max_delay_ms": retry.max_delay.as_millis() as u64,
    });
    let names: Vec<String> = jobs.iter().map(|j| j.backend.name.clone()).collect();
    sqlx::query(
        "INSERT INTO batches (id, owner, priority, backends, retry, job_count)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(batch_id)
    .bind(owner)
    .bind(i16::from(settings.priority.get()))
    .bind(&names)
    .bind(&retry_json)
    .bind(jobs.len() as i32)
    .execute(&mut **tx)
    .await?;
    let backend_ids: Vec<Uuid> = jobs.iter().map(|j| j.backend.id).collect();
    db::lock_backends(tx, &backend_ids).await?;
    let mut out = Vec::with_capacity(jobs.len());
    let meta = Value::Object(meta.clone());
    for j in jobs {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO jobs (id, batch_id, seq, owner, backend_id, op, cid, replaces_cid, name,
                               meta, priority, max_attempts, backoff_base_ms, backoff_factor,
                               backoff_max_ms, cid_key, replaces_key)
             VALUES ($1, $2, 0, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(id)
        .bind(batch_id)
        .bind(owner)
        .bind(j.backend.id)
        .bind(j.op.as_str())
        .bind(j.cid)
        .bind(j.replaces)
        .bind(name)
        .bind(&meta)
        .bind(i16::from(settings.priority.get()))
        .bind(retry.max_attempts as i32)
        .bind(retry.base.as_millis() as i32)
        .bind(retry.factor)
        .bind(retry.max_delay.as_millis() as i32)
        .bind(key_of(j.cid))
        .bind(j.replaces.map(key_of))
        .execute(&mut **tx)
        .await?;
        out.push((id, settings.priority));
    }
    let ids: Vec<Uuid> = out.iter().map(|(id, _)| *id).collect();
    let entry = db::owe_dispatch(tx, &ids, true).await?;
    Ok((batch_id, db::Owed { entry, jobs: out }))
}

/// Inserts the request row; `created` is unique, so a collision is retried with a fresh
/// `clock_timestamp()`.
async fn insert_request_tx(
    tx: &mut Transaction<'_, Postgres>,
    pin: &NewPin,
    batch_id: Uuid,
    backends: &[String],
    replaces: Option<Uuid>,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::new_v4();
    for _ in 0..20 {
        let row: Option<(Uuid,)> = sqlx::query_as(
            "INSERT INTO pin_requests (id, owner, cid, cid_canonical, name, origins, meta,
                                       batch_id, backends, replaces)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (created) DO NOTHING
             RETURNING id",
        )
        .bind(id)
        .bind(&pin.owner)
        .bind(&pin.cid)
        .bind(&pin.cid_canonical)
        .bind(&pin.name)
        .bind(&pin.origins)
        .bind(Value::Object(pin.meta.clone()))
        .bind(batch_id)
        .bind(backends)
        .bind(replaces)
        .fetch_optional(&mut **tx)
        .await?;
        if row.is_some() {
            return Ok(id);
        }
    }
    Err(sqlx::Error::Protocol(
        "could not find a unique created timestamp after 20 tries".into(),
    ))
}

/// Stores a new pin request and its pin jobs (one per backend) in one transaction.
pub async fn add_request(
    pool: &PgPool,
    pin: &NewPin,
    backends: &[Backend],
    settings: JobSettings,
) -> Result<(PinRequestRow, Dispatch), sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_cid(&mut tx, &pin.cid_canonical).await?;
    let specs: Vec<JobSpec> = backends
        .iter()
        .map(|b| JobSpec {
            backend: b,
            op: Op::Pin,
            cid: &pin.cid,
            replaces: None,
        })
        .collect();
    let (batch_id, jobs) = insert_batch_tx(
        &mut tx,
        &pin.owner,
        settings,
        &specs,
        pin.name.as_deref(),
        &pin.meta,
    )
    .await?;
    let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
    let id = insert_request_tx(&mut tx, pin, batch_id, &names, None).await?;
    let row = get_request_conn(&mut tx, id, None).await?;
    tx.commit().await?;
    let row = row.ok_or_else(|| sqlx::Error::RowNotFound)?;
    Ok((row, jobs))
}

async fn get_request_conn(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    owner: Option<&str>,
) -> Result<Option<PinRequestRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_SELECT} FROM pin_requests p
         WHERE p.id = $1 AND p.deleted_at IS NULL AND ($2::text IS NULL OR p.owner = $2)"
    )))
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut **tx)
    .await
}

/// A live request visible to `owner` (`None`: any owner).
pub async fn get_request(
    pool: &PgPool,
    id: Uuid,
    owner: Option<&str>,
) -> Result<Option<PinRequestRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_SELECT} FROM pin_requests p
         WHERE p.id = $1 AND p.deleted_at IS NULL AND ($2::text IS NULL OR p.owner = $2)"
    )))
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await
}

/// The filters of `GET /pins`, validated.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `None`: every owner (admin).
    pub owner: Option<String>,
    /// Canonical CIDs.
    pub cids: Option<Vec<String>>,
    pub name: Option<(String, TextMatch)>,
    pub statuses: Vec<PinStatus>,
    pub before: Option<DateTime<Utc>>,
    pub after: Option<DateTime<Utc>>,
    pub limit: i64,
    pub meta: Option<Map<String, Value>>,
}

/// One page, newest first, and the count of every request matching the filters.
pub async fn list_requests(
    pool: &PgPool,
    f: &ListFilter,
) -> Result<(i64, Vec<PinRequestRow>), sqlx::Error> {
    let statuses: Vec<&str> = f.statuses.iter().map(|s| s.as_str()).collect();
    let (name, mode) = f
        .name
        .as_ref()
        .map(|(n, m)| (Some(n.as_str()), m.as_str()))
        .unwrap_or((None, "exact"));
    let meta = f.meta.clone().map(Value::Object);
    #[derive(FromRow)]
    struct Counted {
        #[sqlx(flatten)]
        row: PinRequestRow,
        total: i64,
    }
    let rows: Vec<Counted> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH r AS (
             SELECT {ROW_SELECT} FROM pin_requests p
             WHERE p.deleted_at IS NULL
               AND ($1::text IS NULL OR p.owner = $1)
               AND ($2::text[] IS NULL OR p.cid_canonical = ANY($2))
               AND ($3::text IS NULL OR CASE $4
                     WHEN 'exact' THEN p.name = $3
                     WHEN 'iexact' THEN lower(p.name) = lower($3)
                     WHEN 'partial' THEN strpos(p.name, $3) > 0
                     ELSE strpos(lower(p.name), lower($3)) > 0 END)
               AND ($5::timestamptz IS NULL OR p.created < $5)
               AND ($6::timestamptz IS NULL OR p.created > $6)
               AND ($7::jsonb IS NULL OR p.meta @> $7)
         )
         SELECT r.*, count(*) OVER () AS total FROM r
         WHERE r.status = ANY($8)
         ORDER BY r.created DESC
         LIMIT $9"
    )))
    .bind(f.owner.as_deref())
    .bind(f.cids.as_ref())
    .bind(name)
    .bind(mode)
    .bind(f.before)
    .bind(f.after)
    .bind(meta)
    .bind(&statuses)
    .bind(f.limit)
    .fetch_all(pool)
    .await?;
    let total = rows.first().map_or(0, |r| r.total);
    let total = if rows.is_empty() {
        // The window count is unknown without a row; a page past the end (or no match)
        // means nothing matched with these filters.
        0
    } else {
        total
    };
    Ok((total, rows.into_iter().map(|r| r.row).collect()))
}

/// A live request taken out of service (deleted or replaced), as it was.
#[derive(Debug, Clone, FromRow)]
struct Removed {
    owner: String,
    cid: String,
    cid_canonical: String,
    batch_id: Uuid,
    backends: Vec<String>,
}

async fn take_request(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    owner: Option<&str>,
) -> Result<Option<Removed>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE pin_requests SET deleted_at = now()
         WHERE id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR owner = $2)
         RETURNING owner, cid, cid_canonical, batch_id, backends",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut **tx)
    .await
}

/// Stops whatever of a request's batch has not finished: queued jobs are cancelled, a
/// running one is asked to stop.
async fn stop_batch(tx: &mut Transaction<'_, Postgres>, batch_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET
             state = CASE WHEN state IN ('queued', 'retry_wait') THEN 'cancelled' ELSE state END,
             finished_at = CASE WHEN state IN ('queued', 'retry_wait') THEN now() ELSE finished_at END,
             cancel_requested = cancel_requested OR state = 'running',
             retry_at = NULL, blocked_by = NULL, updated_at = now()
         WHERE batch_id = $1 AND state IN ('queued', 'retry_wait', 'running')",
    )
    .bind(batch_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Backends on which another live request of `owner` still holds this CID. (Other
/// owners' references are the pin index's to count: an owner's unpin job removes only its
/// own, and the node's pin goes with the last.)
async fn still_held(
    tx: &mut Transaction<'_, Postgres>,
    canonical: &str,
    owner: &str,
) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT unnest(backends) FROM pin_requests
         WHERE cid_canonical = $1 AND owner = $2 AND deleted_at IS NULL",
    )
    .bind(canonical)
    .bind(owner)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|(b,)| b).collect())
}

async fn backends_named(
    tx: &mut Transaction<'_, Postgres>,
    names: &[String],
) -> Result<Vec<Backend>, sqlx::Error> {
    let mut found: Vec<Backend> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM backends WHERE name = ANY($1)",
        db::BACKEND_COLUMNS
    )))
    .bind(names)
    .fetch_all(&mut **tx)
    .await?;
    found.sort_by_key(|b| names.iter().position(|n| *n == b.name));
    Ok(found)
}

/// Deletes a live request: stops its jobs, and unpins its CID (its owner's reference)
/// from each of its backends where no other live request of that owner holds it. `None`:
/// no such request for this owner;
/// `Some(None)`: deleted, nothing to unpin.
pub async fn delete_request(
    pool: &PgPool,
    id: Uuid,
    owner: Option<&str>,
    settings: JobSettings,
) -> Result<Option<Option<Dispatch>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(old) = take_request(&mut tx, id, owner).await? else {
        return Ok(None);
    };
    lock_cid(&mut tx, &old.cid_canonical).await?;
    stop_batch(&mut tx, old.batch_id).await?;
    let held = still_held(&mut tx, &old.cid_canonical, &old.owner).await?;
    let release: Vec<String> = old
        .backends
        .iter()
        .filter(|b| !held.contains(*b))
        .cloned()
        .collect();
    let backends = backends_named(&mut tx, &release).await?;
    let mut dispatch = None;
    if !backends.is_empty() {
        let specs: Vec<JobSpec> = backends
            .iter()
            .map(|b| JobSpec {
                backend: b,
                op: Op::Unpin,
                cid: &old.cid,
                replaces: None,
            })
            .collect();
        let (_, jobs) =
            insert_batch_tx(&mut tx, &old.owner, settings, &specs, None, &Map::new()).await?;
        dispatch = Some(jobs);
    }
    tx.commit().await?;
    Ok(Some(dispatch))
}

/// What a replace found.
#[derive(Debug)]
pub enum Replaced {
    /// No live request with that id for this owner.
    NotFound,
    /// None of the request's backends exists any more.
    NoBackend,
    Done(Box<PinRequestRow>, Dispatch),
}

/// Replaces a live request with a new one (new requestid) in one transaction. On each of
/// the old request's backends the job is a `replace` (pin the new CID, then unpin the old),
/// or a plain `pin` where another live request of its owner still holds the old CID or
/// the CID is unchanged.
pub async fn replace_request(
    pool: &PgPool,
    id: Uuid,
    owner: Option<&str>,
    new: NewPin,
    settings: JobSettings,
) -> Result<Replaced, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(old) = take_request(&mut tx, id, owner).await? else {
        return Ok(Replaced::NotFound);
    };
    // The new request belongs to the owner of the one it replaces (an admin may replace
    // any tenant's request).
    let new = NewPin {
        owner: old.owner.clone(),
        ..new
    };
    let mut keys = [old.cid_canonical.clone(), new.cid_canonical.clone()];
    keys.sort();
    lock_cid(&mut tx, &keys[0]).await?;
    if keys[1] != keys[0] {
        lock_cid(&mut tx, &keys[1]).await?;
    }
    stop_batch(&mut tx, old.batch_id).await?;
    let held = still_held(&mut tx, &old.cid_canonical, &old.owner).await?;
    let backends = backends_named(&mut tx, &old.backends).await?;
    if backends.is_empty() {
        tx.rollback().await?;
        return Ok(Replaced::NoBackend);
    }
    let same = old.cid_canonical == new.cid_canonical;
    let specs: Vec<JobSpec> = backends
        .iter()
        .map(|b| {
            let unpin_old = !same && !held.contains(&b.name);
            JobSpec {
                backend: b,
                op: if unpin_old { Op::Replace } else { Op::Pin },
                cid: &new.cid,
                replaces: unpin_old.then_some(old.cid.as_str()),
            }
        })
        .collect();
    let (batch_id, jobs) = insert_batch_tx(
        &mut tx,
        &new.owner,
        settings,
        &specs,
        new.name.as_deref(),
        &new.meta,
    )
    .await?;
    let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
    let new_id = insert_request_tx(&mut tx, &new, batch_id, &names, Some(id)).await?;
    sqlx::query("UPDATE pin_requests SET replaced_by = $2 WHERE id = $1")
        .bind(id)
        .bind(new_id)
        .execute(&mut *tx)
        .await?;
    let row = get_request_conn(&mut tx, new_id, None).await?;
    tx.commit().await?;
    match row {
        Some(row) => Ok(Replaced::Done(Box::new(row), jobs)),
        None => Err(sqlx::Error::RowNotFound),
    }
}

/// The latest peer id each backend's health probes recorded, by backend id.
pub async fn probed_peer_ids(pool: &PgPool) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT DISTINCT ON (backend_id) backend_id, peer_id FROM backend_probes
         WHERE peer_id IS NOT NULL ORDER BY backend_id, probed_at DESC",
    )
    .fetch_all(pool)
    .await
}

/// Best effort: asks a Kubo-compatible node to connect to each origin (`swarm/connect`),
/// so it can fetch the data from the client directly. Failures are returned, not raised.
pub async fn connect_origins(
    http: &reqwest::Client,
    backend_url: &str,
    origins: &[String],
    timeout: std::time::Duration,
) -> Vec<String> {
    let mut errors = Vec::new();
    for origin in origins {
        let url = format!("{}/api/v0/swarm/connect", backend_url.trim_end_matches('/'));
        let r = http
            .post(&url)
            .query(&[("arg", origin.as_str())])
            .timeout(timeout)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => errors.push(format!("{origin}: HTTP {}", resp.status())),
            Err(e) => errors.push(format!("{origin}: {e}")),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_round_trip() {
        for s in PinStatus::ALL {
            assert_eq!(s.as_str().parse::<PinStatus>().unwrap(), s);
        }
        assert!("done".parse::<PinStatus>().is_err());
        assert!("Pinned".parse::<PinStatus>().is_err());
    }

    #[test]
    fn text_matching() {
        assert_eq!(
            "ipartial".parse::<TextMatch>().unwrap(),
            TextMatch::IPartial
        );
        assert!("fuzzy".parse::<TextMatch>().is_err());
        assert!(TextMatch::Exact.matches("Photo.JPG", "Photo.JPG"));
        assert!(!TextMatch::Exact.matches("Photo.JPG", "photo.jpg"));
        assert!(TextMatch::IExact.matches("Photo.JPG", "photo.jpg"));
        assert!(!TextMatch::IExact.matches("Photo.JPG", "photo"));
        assert!(TextMatch::Partial.matches("Photo.JPG", "to.J"));
        assert!(!TextMatch::Partial.matches("Photo.JPG", "to.j"));
        assert!(TextMatch::IPartial.matches("Photo.JPG", "TO.j"));
    }

    #[test]
    fn meta_must_be_an_object_of_strings() {
        assert!(parse_meta(&json!({"app": "x", "k": ""})).is_ok());
        assert!(parse_meta(&json!({})).is_ok());
        assert!(parse_meta(&json!({"n": 1})).unwrap_err().contains("'n'"));
        assert!(parse_meta(&json!(["a"])).is_err());
        assert!(parse_meta(&json!("a")).is_err());
    }

    #[test]
    fn created_keeps_microseconds() {
        let t: DateTime<Utc> = "2026-11-27T10:00:00.123456Z".parse().unwrap();
        let s = format_created(t);
        assert_eq!(s, "2026-11-27T10:00:00.123456Z");
        assert_eq!(s.parse::<DateTime<Utc>>().unwrap(), t);
    }

    #[test]
    fn delegates_from_urls() {
        let id = "12D3KooWAbc";
        assert_eq!(
            delegate_from_url("http://127.0.0.1:5001", 4001, id).as_deref(),
            Some("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWAbc")
        );
        assert_eq!(
            delegate_from_url("http://ipfs.example.com:5001/", 4001, id).as_deref(),
            Some("/dns4/ipfs.example.com/tcp/4001/p2p/12D3KooWAbc")
        );
        assert_eq!(
            delegate_from_url("http://[::1]:5001", 4002, id).as_deref(),
            Some("/ip6/::1/tcp/4002/p2p/12D3KooWAbc")
        );
        assert_eq!(
            delegate_from_url("http://user:pw@10.0.0.1", 4001, id).as_deref(),
            Some("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWAbc")
        );
        assert_eq!(delegate_from_url("http://:5001", 4001, id), None);
        assert_eq!(delegate_from_url("http://h:1", 4001, ""), None);
    }

    #[test]
    fn configured_delegates_are_checked() {
        let ok =
            |v: &[&str]| configured_delegates(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(ok(&[]), Ok(vec![]));
        assert_eq!(ok(&[""]), Ok(vec![]));
        assert_eq!(
            ok(&[
                " /dns4/pin.example.net/tcp/4001/p2p/12D3KooWAbc ",
                "/ip4/203.0.113.1/udp/4001/quic-v1/p2p/QmPeer"
            ]),
            Ok(vec![
                "/dns4/pin.example.net/tcp/4001/p2p/12D3KooWAbc".to_owned(),
                "/ip4/203.0.113.1/udp/4001/quic-v1/p2p/QmPeer".to_owned()
            ])
        );
        for bad in [
            "ip4/1.2.3.4/tcp/4001/p2p/QmPeer",
            "/ip4/1.2.3.4/tcp/4001",
            "/ip4/1.2.3.4/tcp/4001/p2p/",
            "/ip4/1.2.3.4/tcp/4001/p2p/QmPeer/p2p-circuit",
            "/ip4/1.2.3.4/tcp/4001/p2p/Qm Peer",
        ] {
            let err = ok(&[bad]).unwrap_err();
            assert!(
                err.contains(bad) && err.contains("/p2p/<peer id>"),
                "{bad}: {err}"
            );
        }
        let twice = ok(&[
            "/ip4/1.2.3.4/tcp/4001/p2p/QmPeer",
            "/ip4/1.2.3.4/tcp/4001/p2p/QmPeer",
        ]);
        assert!(twice.unwrap_err().contains("listed twice"));
        let many: Vec<String> = (0..21)
            .map(|i| format!("/ip4/10.0.0.{i}/tcp/4001/p2p/QmPeer"))
            .collect();
        assert!(
            configured_delegates(&many)
                .unwrap_err()
                .contains("at most 20")
        );
        assert_eq!(configured_delegates(&many[..20]).map(|d| d.len()), Ok(20));
    }

    #[test]
    fn reported_addresses_win_and_end_in_p2p() {
        let id = "QmPeer";
        let reported = vec![
            "/ip4/1.2.3.4/tcp/4001".to_owned(),
            "/ip4/1.2.3.4/tcp/4001/p2p/QmPeer".to_owned(),
            "/ip4/5.6.7.8/tcp/4001/p2p/QmOther".to_owned(),
            "/ip4/9.9.9.9/tcp/4001/p2p/QmRelay/p2p-circuit".to_owned(),
        ];
        assert_eq!(
            delegates_of("http://127.0.0.1:5001", 4001, id, &reported),
            vec!["/ip4/1.2.3.4/tcp/4001/p2p/QmPeer"]
        );
        assert_eq!(
            delegates_of("http://127.0.0.1:5001", 4001, id, &[]),
            vec!["/ip4/127.0.0.1/tcp/4001/p2p/QmPeer"]
        );
    }
}
