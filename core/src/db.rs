//! PostgreSQL: the source of truth. Connection pool, embedded migrations, and every query
//! that moves a job through its states.
//!
//! Outcome writes are fenced: they apply only `WHERE lease_owner = me AND attempt = n AND
//! state = 'running'`, so a worker that was presumed dead can never overwrite a newer
//! attempt. An attempt that ends in success is recorded on the job's row (`succeeded_by`,
//! with `attempt`, `started_at` and `finished_at`); one that ends any other way gets its
//! `job_attempts` record in the same statement or transaction as the job's new state.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, FromRow, PgConnection};
use uuid::Uuid;

use crate::cid::key_of;
use crate::model::{JobState, Op, Priority};
use crate::retry::RetryPolicy;

/// The one schema, embedded in every binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Opens a pool. Fails if PostgreSQL cannot be reached within the acquire timeout.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
}

/// Creates the database named in `url` if it does not exist yet, by connecting to the
/// server's `postgres` database. Lets a newcomer start from an empty server.
pub async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::ConnectOptions;
    use sqlx::postgres::PgConnectOptions;

    let opts: PgConnectOptions = url.parse()?;
    let Some(name) = opts.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut conn = opts.clone().database("postgres").connect().await?;
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut conn)
        .await?;
    if exists.is_none() {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
            .execute(&mut conn)
            .await
        {
            // Another process created it in the meantime.
            Err(e) if matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42P04")) =>
                {}
            other => {
                other?;
            }
        }
    }
    use sqlx::Connection;
    conn.close().await?;
    Ok(())
}

/// Whether an error means the database could not be reached (as opposed to a query the
/// database refused). Callers answer the former with "try again later".
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
    ) || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| {
        // Connection failures, an administrator shutdown, and a deadlock or
        // serialization failure: all pass if the request is simply made again.
        c.starts_with("57P") || c.starts_with("08") || c == "40P01" || c == "40001"
    }))
}

/// Whether an error is a unique-constraint violation.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

// ---------------------------------------------------------------------------------------
// Backends

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Backend {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    pub url: String,
    pub enabled: bool,
    pub status: String,
    pub status_since: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the index update's last complete listing of the backend's pins began.
    pub pins_listed_at: Option<DateTime<Utc>>,
}

/// The columns of [`Backend`], for every query that reads one.
pub(crate) const BACKEND_COLUMNS: &str =
    "id, name, kind, url, enabled, status, status_since, created_at, updated_at, pins_listed_at";

/// Inserts a backend. A name already taken is a unique violation (see
/// [`is_unique_violation`]).
pub async fn insert_backend(
    pool: &PgPool,
    name: &str,
    kind: &str,
    url: &str,
) -> Result<Backend, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "INSERT INTO backends (id, name, kind, url) VALUES ($1, $2, $3, $4) RETURNING {BACKEND_COLUMNS}"
    )))
    .bind(Uuid::new_v4())
    .bind(name)
    .bind(kind)
    .bind(url)
    .fetch_one(pool)
    .await
}

/// Creates the backend or points an existing one of that name at `url`.
pub async fn upsert_backend(
    pool: &PgPool,
    name: &str,
    kind: &str,
    url: &str,
) -> Result<Backend, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "INSERT INTO backends (id, name, kind, url) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, url = EXCLUDED.url, updated_at = now()
         RETURNING {BACKEND_COLUMNS}"
    )))
    .bind(Uuid::new_v4())
    .bind(name)
    .bind(kind)
    .bind(url)
    .fetch_one(pool)
    .await
}

pub async fn list_backends(pool: &PgPool) -> Result<Vec<Backend>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {BACKEND_COLUMNS} FROM backends ORDER BY name"
    )))
    .fetch_all(pool)
    .await
}

pub async fn backends_by_name(
    pool: &PgPool,
    names: &[String],
) -> Result<Vec<Backend>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {BACKEND_COLUMNS} FROM backends WHERE name = ANY($1)"
    )))
    .bind(names)
    .fetch_all(pool)
    .await
}

pub async fn backend_by_id(pool: &PgPool, id: Uuid) -> Result<Option<Backend>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {BACKEND_COLUMNS} FROM backends WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

// ---------------------------------------------------------------------------------------
// Batches and jobs: ingest

/// A batch ready to store: validated, with backends resolved.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub id: Uuid,
    pub owner: String,
    pub priority: Priority,
    pub backends: Vec<String>,
    pub retry: RetryPolicy,
    pub idempotency_key: Option<String>,
    /// With an idempotency key: a digest of the request as the client sent it, kept with
    /// the batch, so that the key used again can be told a retry (the same request) from a
    /// different request. Only stored when there is a key.
    pub request_digest: Option<Vec<u8>>,
    pub jobs: Vec<NewJob>,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub seq: i32,
    pub backend_id: Uuid,
    pub op: Op,
    pub cid: String,
    pub replaces_cid: Option<String>,
    /// The canonical forms of `cid` and `replaces_cid` ([`crate::cid::PinCid::canonical`]):
    /// jobs sharing a key and a backend run in submission order.
    pub cid_key: String,
    pub replaces_key: Option<String>,
    pub name: Option<String>,
    pub meta: Value,
    /// For an unpin or a replace: remove the pin for every owner that holds it, not only
    /// the batch owner's reference (an admin's removal).
    pub unpin_all: bool,
}

/// Jobs committed `queued` whose messages the committing process publishes itself right
/// after the commit. `entry` is their `dispatch_outbox` row: [`settle_dispatch`] deletes it
/// once the broker has confirmed every message; if that never happens, the relay publishes
/// them after its grace period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    pub entry: i64,
    pub jobs: Vec<(Uuid, Priority)>,
}

/// What storing a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// The batch and its jobs were committed; their messages are still owed to the broker.
    Created { id: Uuid, owed: Owed },
    /// A batch with the same owner and idempotency key already exists; nothing was written.
    /// `same_request`: it was stored from the same request (the same
    /// [`NewBatch::request_digest`]); a batch stored before requests were recorded counts
    /// as the same.
    Existing {
        id: Uuid,
        job_count: i32,
        same_request: bool,
    },
}

/// The statements of [`insert_batch`], with the request's digest ($24) for a batch with an
/// idempotency key, and without it.
static INSERT_BATCH_WITH_DIGEST: LazyLock<String> = LazyLock::new(|| {
    INSERT_BATCH
        .replace("{digest_column}", ", request_digest")
        .replace("{digest_value}", ", $24")
});
static INSERT_BATCH_WITHOUT_DIGEST: LazyLock<String> = LazyLock::new(|| {
    INSERT_BATCH
        .replace("{digest_column}", "")
        .replace("{digest_value}", "")
});

const INSERT_BATCH: &str = "WITH b AS (
         INSERT INTO batches (id, owner, priority, backends, retry, idempotency_key, job_count
                              {digest_column})
         VALUES ($1, $2, $3, $4, $5, $6, $7{digest_value})
         ON CONFLICT (owner, idempotency_key) DO NOTHING
         RETURNING id
     ), j AS (
         INSERT INTO jobs (id, batch_id, seq, owner, backend_id, op, cid, replaces_cid, name,
                           meta, priority, max_attempts, backoff_base_ms, backoff_factor,
                           backoff_max_ms, cid_key, replaces_key, unpin_all)
         SELECT t.id, b.id, t.seq, $2, t.backend_id, t.op, t.cid, t.replaces_cid, t.name,
                t.meta::jsonb, $3, $16, $17, $18, $19, t.cid_key, t.replaces_key,
                t.unpin_all
         FROM b, UNNEST($8::uuid[], $9::int4[], $10::uuid[], $11::text[], $12::text[],
                        $13::text[], $14::text[], $15::text[], $21::text[], $22::text[],
                        $23::bool[])
              AS t(id, seq, backend_id, op, cid, replaces_cid, name, meta, cid_key,
                   replaces_key, unpin_all)
     )
     INSERT INTO dispatch_outbox (job_ids, self_publishing)
     SELECT $8, true FROM b, (SELECT pinq_lock_backends($20)) AS locked
     RETURNING id";

/// Stores a batch and all its jobs, and owes their messages in the dispatch outbox, in
/// one statement: one round trip and one commit whatever the batch's size. If the owner
/// already has a batch with this idempotency key, nothing is written, and the answer says
/// whether that batch was stored from the same request.
pub async fn insert_batch(pool: &PgPool, batch: &NewBatch) -> Result<Stored, sqlx::Error> {
    let retry_json = serde_json::json!({
        "max_attempts": batch.retry.max_attempts,
        "base_ms": batch.retry.base.as_millis() as u64,
        "factor": batch.retry.factor,
        "max_delay_ms": batch.retry.max_delay.as_millis() as u64,
    });
    // The statement's columns borrow from the jobs: a batch of 10,000 is not copied again.
    let n = batch.jobs.len();
    let mut ids = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    let mut backend_ids = Vec::with_capacity(n);
    let mut ops: Vec<&str> = Vec::with_capacity(n);
    let mut cids: Vec<&str> = Vec::with_capacity(n);
    let mut replaces: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut cid_keys: Vec<&str> = Vec::with_capacity(n);
    let mut replaces_keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut names: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut unpin_all = Vec::with_capacity(n);
    // Most jobs have no meta: they all bind one "{}".
    let meta_texts: Vec<Option<String>> = batch
        .jobs
        .iter()
        .map(|j| match &j.meta {
            Value::Object(m) if m.is_empty() => None,
            meta => Some(meta.to_string()),
        })
        .collect();
    let metas: Vec<&str> = meta_texts
        .iter()
        .map(|m| m.as_deref().unwrap_or("{}"))
        .collect();
    for j in &batch.jobs {
        ids.push(j.id);
        seqs.push(j.seq);
        backend_ids.push(j.backend_id);
        ops.push(j.op.as_str());
        cids.push(j.cid.as_str());
        replaces.push(j.replaces_cid.as_deref());
        cid_keys.push(j.cid_key.as_str());
        replaces_keys.push(j.replaces_key.as_deref());
        names.push(j.name.as_deref());
        unpin_all.push(j.unpin_all);
    }
    let mut backends = backend_ids.clone();
    backends.sort_unstable();
    backends.dedup();
    let digest = batch
        .idempotency_key
        .as_ref()
        .and(batch.request_digest.as_ref());
    // The jobs and the outbox row are written only if the batch row was (`FROM b`); the
    // backends' lock (see `lock_backends`) is taken before the statement commits, which is
    // all it needs.
    //
    // The digest's column is named only when there is a key: the statement for a batch
    // without one is the one from before the column, which the migration tests use to
    // store their data on the schemas before it.
    let sql = if digest.is_some() {
        &INSERT_BATCH_WITH_DIGEST
    } else {
        &INSERT_BATCH_WITHOUT_DIGEST
    };
    let mut insert = sqlx::query_as(AssertSqlSafe(sql.as_str()))
        .bind(batch.id)
        .bind(&batch.owner)
        .bind(i16::from(batch.priority.get()))
        .bind(&batch.backends)
        .bind(&retry_json)
        .bind(&batch.idempotency_key)
        .bind(n as i32)
        .bind(&ids)
        .bind(&seqs)
        .bind(&backend_ids)
        .bind(&ops)
        .bind(&cids)
        .bind(&replaces)
        .bind(&names)
        .bind(&metas)
        .bind(batch.retry.max_attempts as i32)
        .bind(batch.retry.base.as_millis() as i32)
        .bind(batch.retry.factor)
        .bind(batch.retry.max_delay.as_millis() as i32)
        .bind(&backends)
        .bind(&cid_keys)
        .bind(&replaces_keys)
        .bind(&unpin_all);
    if let Some(digest) = &digest {
        insert = insert.bind(digest);
    }
    let entry: Option<(i64,)> = insert.fetch_optional(pool).await?;
    let Some((entry,)) = entry else {
        let (id, job_count, stored): (Uuid, i32, Option<Vec<u8>>) = sqlx::query_as(
            "SELECT id, job_count, request_digest FROM batches
             WHERE owner = $1 AND idempotency_key = $2",
        )
        .bind(&batch.owner)
        .bind(&batch.idempotency_key)
        .fetch_one(pool)
        .await?;
        return Ok(Stored::Existing {
            id,
            job_count,
            same_request: stored.is_none() || stored.as_ref() == digest,
        });
    };
    Ok(Stored::Created {
        id: batch.id,
        owed: Owed {
            entry,
            jobs: ids.into_iter().map(|id| (id, batch.priority)).collect(),
        },
    })
}

/// Locks the backends that jobs about to be inserted name, so none of them can be deleted
/// before the transaction ends (`jobs` has no foreign key on them; see the migration that
/// dropped it). Fails with a foreign-key violation (23503) if one no longer exists.
pub async fn lock_backends(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pinq_lock_backends($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records, in the caller's transaction, that messages are owed to the broker for these
/// jobs, which the same transaction commits as `queued`. `self_publishing`: the caller
/// publishes them itself right after the commit and then calls [`settle_dispatch`]; the
/// relay only steps in after its grace period. Otherwise the relay publishes them on its
/// next pass. Returns the entry's id.
pub async fn owe_dispatch(
    conn: &mut PgConnection,
    ids: &[Uuid],
    self_publishing: bool,
) -> Result<i64, sqlx::Error> {
    let (entry,): (i64,) = sqlx::query_as(
        "INSERT INTO dispatch_outbox (job_ids, self_publishing) VALUES ($1, $2) RETURNING id",
    )
    .bind(ids)
    .bind(self_publishing)
    .fetch_one(conn)
    .await?;
    Ok(entry)
}

/// The broker confirmed every message of an outbox entry: nothing is owed any more. The
/// entry is kept, marked published, until the relay's safety net has checked that its
/// jobs started (see [`relay_reowe_stale`]).
pub async fn settle_dispatch(pool: &PgPool, entry: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE dispatch_outbox SET published_at = now() WHERE id = $1")
        .bind(entry)
        .execute(pool)
        .await?;
    Ok(())
}

/// Of the given (backend, canonical CID) pairs, those the pin index holds without a
/// reference of `owner`: other tenants' pins, and pins made outside pinq (`unmanaged`),
/// unless the owner's own pin of it ran and ended without a recorded success
/// ([`unrecorded_pin`]).
pub async fn pins_not_owned_by(
    pool: &PgPool,
    owner: &str,
    pairs: &[(Uuid, String)],
) -> Result<std::collections::HashSet<(Uuid, String)>, sqlx::Error> {
    let (backends, cids): (Vec<Uuid>, Vec<String>) = pairs.iter().cloned().unzip();
    static NOT_OWNED: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT p.backend_id, p.cid FROM pins p
             JOIN UNNEST($1::uuid[], $2::text[]) AS t(backend_id, cid)
               ON p.backend_id = t.backend_id AND p.cid = t.cid
             WHERE p.owner IS DISTINCT FROM $3 AND NOT coalesce($3 = ANY (p.others), false)
               AND NOT (p.owner IS NULL AND {})",
            unrecorded_pin("$3", "p.backend_id", "p.cid", "9223372036854775807")
        )
    });
    let rows: Vec<(Uuid, String)> = sqlx::query_as(AssertSqlSafe(NOT_OWNED.as_str()))
        .bind(&backends)
        .bind(&cids)
        .bind(owner)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

// ---------------------------------------------------------------------------------------
// Worker side: claim, lease, outcome

/// A job a worker holds the lease on.
#[derive(Debug, Clone, FromRow)]
pub struct ClaimedJob {
    pub id: Uuid,
    pub batch_id: Uuid,
    pub backend_id: Uuid,
    pub owner: String,
    pub op: String,
    pub cid: String,
    pub replaces_cid: Option<String>,
    pub name: Option<String>,
    pub priority: i16,
    pub attempt: i32,
    pub max_attempts: i32,
    pub backoff_base_ms: i32,
    pub backoff_factor: f64,
    pub backoff_max_ms: i32,
    /// When this attempt started (the claim).
    pub started_at: DateTime<Utc>,
    /// The claim (`job_claims`) whose lease covers this attempt.
    pub claim_id: i64,
    /// See [`NewJob::unpin_all`].
    pub unpin_all: bool,
    /// For an unpin or a replace: someone but this owner may hold the pin this job
    /// removes, so the node keeps it and only this owner's reference, if any, goes.
    /// Another owner holds a reference; or the index holds the pin for nobody in pinq, or
    /// has no row for it, and no earlier pin of this owner's ran and ended without a
    /// recorded success ([`unrecorded_pin`]): the pin was made outside pinq, or never.
    /// Read when the job was claimed; jobs on one CID and backend run one at a time, so no
    /// other job changes the pin's references while this one runs.
    pub others_hold: bool,
}

impl ClaimedJob {
    /// The CID this job unpins: an unpin's own, or the old CID of a replace that changes
    /// the content (a replace of a CID by another spelling of it unpins nothing).
    pub fn removes(&self) -> Option<&str> {
        match self.op.parse::<Op>() {
            Ok(Op::Unpin) => Some(self.cid.as_str()),
            Ok(Op::Replace) => self
                .replaces_cid
                .as_deref()
                .filter(|old| key_of(old) != key_of(&self.cid)),
            _ => None,
        }
    }

    /// Whether the node is asked to unpin [`Self::removes`]: not while another owner
    /// still holds a reference to it.
    pub fn unpins_on_node(&self) -> bool {
        self.removes().is_some() && !self.others_hold
    }

    /// Whether the job calls its backend at all: not an unpin that only removes its
    /// owner's reference.
    pub fn calls_node(&self) -> bool {
        self.op != "unpin" || self.unpins_on_node()
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1) as u32,
            base: Duration::from_millis(self.backoff_base_ms.max(0) as u64),
            factor: self.backoff_factor,
            max_delay: Duration::from_millis(self.backoff_max_ms.max(0) as u64),
        }
    }
}

/// The statement of [`claim_jobs`].
static CLAIM: LazyLock<String> = LazyLock::new(|| {
    CLAIM_TEMPLATE.replace(
        "__UNRECORDED_PIN__",
        &unrecorded_pin("j.owner", "j.backend_id", "k.key", "j.submit_seq"),
    )
});

const CLAIM_TEMPLATE: &str = "WITH target AS (
             SELECT id, backend_id, cid_key, replaces_key, submit_seq FROM jobs
             WHERE id = ANY($1) AND state = 'queued'
             ORDER BY id FOR UPDATE
         ), ahead AS (
             -- For each job, the latest other job on one of its keys that runs now or is
             -- earlier and has not ended. Almost every job finds only itself.
             SELECT t.id, a.id AS blocker FROM target t
             CROSS JOIN LATERAL (
                 SELECT o.id FROM jobs o
                 WHERE o.backend_id = t.backend_id
                   AND (o.cid_key IN (t.cid_key, t.replaces_key)
                        OR o.replaces_key IN (t.cid_key, t.replaces_key))
                   AND o.id <> t.id
                   AND (o.state = 'running'
                        OR (o.state IN ('queued', 'retry_wait') AND o.submit_seq < t.submit_seq))
                 ORDER BY o.submit_seq DESC LIMIT 1
             ) a
         ), parked AS (
             UPDATE jobs j
             SET state = 'retry_wait', retry_at = NULL, blocked_by = ahead.blocker,
                 updated_at = now(),
                 last_error = 'waiting for job ' || ahead.blocker
                              || ', an earlier operation on this CID and backend'
             FROM ahead WHERE j.id = ahead.id
         ), ready AS (
             SELECT id FROM target WHERE id NOT IN (SELECT id FROM ahead)
         ), claim AS (
             INSERT INTO job_claims (worker_id, job_ids, lease_until)
             SELECT $2, array_agg(id), now() + make_interval(secs => $3) FROM ready
             HAVING count(*) > 0
             RETURNING id
         ), c AS (
             UPDATE jobs j
             SET state = 'running', attempt = j.attempt + 1, lease_owner = $2,
                 claim_id = claim.id, started_at = now(), updated_at = now()
             FROM ready, claim WHERE j.id = ready.id
             RETURNING j.id, j.batch_id, j.backend_id, j.owner, j.op, j.cid, j.replaces_cid,
                       j.name, j.priority, j.attempt, j.max_attempts, j.backoff_base_ms,
                       j.backoff_factor, j.backoff_max_ms, j.started_at, j.claim_id,
                       j.unpin_all,
                       -- Whether anyone but this job's owner may hold the pin it
                       -- removes, so that the node must keep it. With a row in the pin
                       -- index that names an owner: unless the row is this owner's alone.
                       -- Without a row, or with one held by nobody in pinq (`unmanaged`):
                       -- unless this owner's own earlier pin of it ran and ended without a
                       -- recorded success (`unrecorded_pin`); otherwise the pin is
                       -- none of this owner's doing (made outside pinq, or never made). A
                       -- pin's jobs never look: CASE evaluates only the branch taken.
                       CASE WHEN j.op = 'pin' OR j.unpin_all THEN false
                            ELSE (
                                SELECT CASE
                                    WHEN p.owner IS NOT NULL THEN NOT (
                                        p.owner = j.owner
                                        AND coalesce(array_remove(p.others, j.owner) = '{}', true))
                                    ELSE NOT __UNRECORDED_PIN__
                                END
                                FROM (SELECT CASE WHEN j.op = 'unpin' THEN j.cid_key
                                                  ELSE j.replaces_key END AS key) k
                                LEFT JOIN pins p ON p.backend_id = j.backend_id AND p.cid = k.key)
                       END AS others_hold
         )
         SELECT * FROM c";

/// SQL: whether `owner`'s own earlier pin of `key` on `backend` (a job submitted before
/// `before`) ran and ended without a recorded success: cancelled while it ran, or failed,
/// after the node may have pinned the content all the same. No pin-index row names the
/// owner then, yet the pin may be the owner's doing, so the owner's unpin asks the node
/// ([`claim_jobs`]) and a user token may submit it ([`pins_not_owned_by`]) where the
/// index has no row for the pin, or one held by nobody in pinq (`unmanaged`, as the index
/// update records what it finds on the node). A later unpin of the owner's that
/// succeeded (or a replace that removed the pin) settled it: from then on such a pin is
/// not the owner's. (Written into both statements rather than kept as a function of the
/// schema, so that the statements run on the schemas the migration tests start from.)
fn unrecorded_pin(owner: &str, backend: &str, key: &str, before: &str) -> String {
    format!(
        "EXISTS (
             SELECT 1 FROM jobs o
             WHERE o.cid_key = {key} AND o.backend_id = {backend} AND o.owner = {owner}
               AND o.op IN ('pin', 'replace') AND o.state IN ('cancelled', 'failed')
               AND o.attempt > 0 AND o.submit_seq < {before}
               AND NOT EXISTS (
                   SELECT 1 FROM jobs u
                   WHERE u.backend_id = {backend} AND u.owner = {owner}
                     AND u.state = 'succeeded'
                     AND u.submit_seq > o.submit_seq AND u.submit_seq < {before}
                     AND ((u.op = 'unpin' AND u.cid_key = {key})
                          OR (u.op = 'replace' AND u.replaces_key = {key}))))"
    )
}

/// Atomically moves queued jobs to running under one new lease of this worker (a
/// `job_claims` row naming them) and bumps their attempt, in one statement. Jobs that are
/// not claimable (already running, finished, cancelled or unknown) are left out: their
/// delivery was a duplicate. The claim waits for
/// row locks rather than skipping locked rows: a row locked by a writer that may leave it
/// `queued` (the relay republishing a job that waited long, a cancel or a re-drive under
/// way) must not cost a good delivery. Rows are locked in id order, as the other hot-path
/// writers of jobs do, so claims of overlapping messages queue behind each other instead
/// of deadlocking. The attempt's record is written when it ends (see [`finish_job`]),
/// unless it succeeds; until then the job's row is the record of the running attempt,
/// and after a success it stays the record of that attempt. No column an index of
/// `jobs` names changes, so the rows are updated in place (see the `hot_jobs` migration).
///
/// Jobs on one key (backend, and the canonical form of either CID a job touches) run one
/// at a time in submission order: a job with an earlier job on its key that has not ended,
/// or with any job on its key running now, is not claimed but parked (`retry_wait`, no
/// `retry_at`, `blocked_by` naming the job it waits for) until the relay finds that job
/// ended (see the `cid_order` migration). It is left out of the answer like a duplicate.
pub async fn claim_jobs(
    pool: &PgPool,
    job_ids: &[Uuid],
    worker_id: Uuid,
    lease: Duration,
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(CLAIM.as_str()))
        .bind(job_ids)
        .bind(worker_id)
        .bind(lease.as_secs_f64())
        .fetch_all(pool)
        .await
}

/// What a lease extension found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still ours, extended.
    Held,
    /// Still ours, extended, but a client asked to cancel the job: stop it.
    CancelRequested,
    /// Gone (expired and taken back): stop and write nothing.
    Lost,
}

/// Extends the lease of one of this worker's claims and reports on its jobs this worker
/// still runs (given as `(id, attempt)`), in one statement that writes only the claim's
/// row. Returns each job's status; a job missing from the answer is [`LeaseStatus::Lost`]
/// (its claim expired and the relay took it back, or it is no longer this attempt).
pub async fn extend_leases(
    pool: &PgPool,
    claim_id: i64,
    jobs: &[(Uuid, i32)],
    worker_id: Uuid,
    lease: Duration,
) -> Result<Vec<(Uuid, LeaseStatus)>, sqlx::Error> {
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = jobs.iter().copied().unzip();
    // The claim's row is the fence: the relay takes a claim's jobs back only while holding
    // that row locked with its lease run out, so once this update has extended it the
    // jobs stay ours, and if the relay got there first the row is gone and so is every job.
    let held: Vec<(Uuid, bool)> = sqlx::query_as(
        "WITH ext AS (
             UPDATE job_claims SET lease_until = now() + make_interval(secs => $5)
             WHERE id = $4 AND worker_id = $3
             RETURNING id
         )
         SELECT j.id, j.cancel_requested FROM jobs j
         JOIN UNNEST($1::uuid[], $2::int4[]) AS t(id, attempt)
           ON j.id = t.id AND j.attempt = t.attempt
         JOIN ext ON ext.id = j.claim_id
         WHERE j.lease_owner = $3 AND j.state = 'running'",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(worker_id)
    .bind(claim_id)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await?;
    let held: std::collections::HashMap<Uuid, bool> = held.into_iter().collect();
    Ok(ids
        .into_iter()
        .map(|id| {
            let status = match held.get(&id) {
                None => LeaseStatus::Lost,
                Some(true) => LeaseStatus::CancelRequested,
                Some(false) => LeaseStatus::Held,
            };
            (id, status)
        })
        .collect())
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    /// Try again at `run_at`.
    Retry {
        error: String,
        run_at: DateTime<Utc>,
    },
    Failed {
        error: String,
    },
    /// The worker is stopping: hand the job back to the queue (the message is requeued).
    Released {
        reason: String,
    },
    /// The backend is known to be down: wait until `run_at` without spending an attempt.
    /// The attempt's record is removed, as the backend was never called.
    Deferred {
        run_at: DateTime<Utc>,
    },
    /// A client cancelled the job while it ran.
    Cancelled,
}

/// Writes an attempt's outcome, fenced by (lease_owner, attempt), and the attempt's record
/// (a success's record is the job's row). Returns `false` if the lease was no longer this
/// worker's (nothing was written). On success the pin index is updated in the same
/// transaction; a job handed back to the queue is owed a new message (the relay publishes
/// it).
pub async fn finish_job(
    pool: &PgPool,
    job: &ClaimedJob,
    worker_id: Uuid,
    outcome: &Outcome,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let deferred = matches!(outcome, Outcome::Deferred { .. });
    let (state, attempt_outcome, error, run_at): (&str, &str, Option<&str>, Option<DateTime<Utc>>) =
        match outcome {
            // A success is recorded on the row, not in `job_attempts`.
            Outcome::Succeeded => ("succeeded", "", None, None),
            Outcome::Retry { error, run_at } => ("retry_wait", "retry", Some(error), Some(*run_at)),
            Outcome::Failed { error } => ("failed", "failed", Some(error), None),
            Outcome::Released { reason } => ("queued", "lost", Some(reason), None),
            Outcome::Deferred { run_at } => ("retry_wait", "", None, Some(*run_at)),
            Outcome::Cancelled => ("cancelled", "cancelled", Some("cancelled by request"), None),
        };
    let state_now: Option<(String,)> = sqlx::query_as(
        // A job whose cancellation was requested while it ran ends `cancelled` instead of
        // going back to wait for another attempt.
        // The new state is computed from the row being updated (not from a snapshot), so a
        // cancel committed while this statement waited for the row is still honoured.
        "UPDATE jobs
         SET state = CASE WHEN cancel_requested AND $4 IN ('retry_wait', 'queued')
                          THEN 'cancelled' ELSE $4 END,
             succeeded_by = CASE WHEN $4 = 'succeeded' THEN lease_owner END,
             lease_owner = NULL, updated_at = now(),
             attempt = CASE WHEN $7 THEN attempt - 1 ELSE attempt END,
             last_error = CASE WHEN $4 = 'succeeded' THEN NULL ELSE coalesce($5, last_error) END,
             run_at = coalesce($6, run_at),
             retry_at = CASE WHEN $4 = 'retry_wait' AND NOT cancel_requested THEN $6 END,
             finished_at = CASE WHEN $4 IN ('succeeded', 'failed', 'cancelled')
                                     OR (cancel_requested AND $4 IN ('retry_wait', 'queued'))
                                THEN now() ELSE NULL END
         WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND state = 'running'
         RETURNING state",
    )
    .bind(job.id)
    .bind(worker_id)
    .bind(job.attempt)
    .bind(state)
    .bind(error)
    .bind(run_at)
    .bind(deferred)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((state_now,)) = state_now else {
        tx.rollback().await?;
        return Ok(false);
    };
    // A deferred attempt never called the backend: it is not recorded, and its number is
    // given back above. (A record the claim opened under the old scheme is removed.) A
    // success is recorded on the row.
    if deferred {
        sqlx::query("DELETE FROM job_attempts WHERE job_id = $1 AND attempt = $2")
            .bind(job.id)
            .bind(job.attempt)
            .execute(&mut *tx)
            .await?;
    } else if *outcome != Outcome::Succeeded {
        record_attempts(&mut tx, &[job], worker_id, attempt_outcome, error).await?;
    }
    // Messages are acknowledged once their jobs are claimed, so a job handed back to the
    // queue needs a new one. (Retries get theirs from the relay when they are due.)
    if state_now == "queued" {
        owe_dispatch(&mut tx, &[job.id], false).await?;
    }
    if *outcome == Outcome::Succeeded {
        update_pin_index(&mut tx, &[job]).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Records many successful attempts at once, fenced like [`finish_job`], with their
/// pin-index changes: one statement whatever their number (or, when two of them touch the
/// same pin, one transaction applying those in order). Each success is recorded on its
/// job's row, as no record in `job_attempts` would add anything to it. Returns the ids
/// that were written; the others had lost their lease.
pub async fn finish_succeeded(
    pool: &PgPool,
    jobs: &[&ClaimedJob],
    worker_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let changes: Vec<(&ClaimedJob, PinChange)> =
        jobs.iter().map(|j| (*j, pin_changes(j))).collect();
    if has_conflict(&changes) {
        return finish_succeeded_in_order(pool, jobs, worker_id).await;
    }
    let writes = PinWrites::of(&changes);
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let attempts: Vec<i32> = jobs.iter().map(|j| j.attempt).collect();
    let written: Vec<(Uuid,)> = sqlx::query_as(AssertSqlSafe(format!(
        // Every write after `done` joins it, so a job whose lease was lost writes nothing.
        "WITH {locked}, done AS (
             {SUCCEED}
         ), upserts AS (
             {upsert}
         ), releases AS (
             {release}
         ), deletes AS (
             {delete}
         )
         SELECT id FROM done",
        locked = fenced_locked("$11", "$12", "$13"),
        upsert = PinWrites::UPSERT.replace("{done}", "JOIN done ON done.id = t.job_id"),
        release = PinWrites::release_sql(6, "JOIN done ON done.id = t.job_id"),
        delete = PinWrites::delete_sql(6, "JOIN done ON done.id = t.job_id"),
    )))
    .bind(&writes.up_backends)
    .bind(&writes.up_cids)
    .bind(&writes.up_owners)
    .bind(&writes.up_names)
    .bind(&writes.up_jobs)
    .bind(&writes.del_backends)
    .bind(&writes.del_cids)
    .bind(&writes.del_jobs)
    .bind(&writes.del_owners)
    .bind(&writes.del_kept)
    .bind(&ids)
    .bind(&attempts)
    .bind(worker_id)
    .fetch_all(pool)
    .await?;
    let written: std::collections::HashSet<Uuid> = written.into_iter().map(|(id,)| id).collect();
    Ok(ids.into_iter().filter(|id| written.contains(id)).collect())
}

/// The `locked` CTE of the writers that act on a group of this worker's running attempts:
/// the jobs among the `(id, attempt)` pairs (parameters `ids` and `attempts`) still leased
/// to `worker`, locked in id order like every hot-path writer of jobs, so the completer
/// and the lease keeper never deadlock on the same jobs.
fn fenced_locked(ids: &str, attempts: &str, worker: &str) -> String {
    format!(
        "locked AS (
             SELECT j.id FROM jobs j
             JOIN UNNEST({ids}::uuid[], {attempts}::int4[]) AS t(id, attempt)
               ON j.id = t.id AND j.attempt = t.attempt
             WHERE j.lease_owner = {worker} AND j.state = 'running'
             ORDER BY j.id FOR UPDATE
         )"
    )
}

/// Marks the `locked` jobs succeeded, each by the worker whose lease it was under (the
/// attempt's record); returns their ids.
const SUCCEED: &str = "UPDATE jobs j
     SET state = 'succeeded', succeeded_by = j.lease_owner, lease_owner = NULL,
         last_error = NULL, finished_at = now(), updated_at = now()
     FROM locked WHERE j.id = locked.id
     RETURNING j.id";

/// [`finish_succeeded`] for a group in which two jobs touch the same pin: one transaction,
/// the pin-index changes applied one job at a time in order, so the last one wins as it
/// would have alone.
async fn finish_succeeded_in_order(
    pool: &PgPool,
    jobs: &[&ClaimedJob],
    worker_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let attempts: Vec<i32> = jobs.iter().map(|j| j.attempt).collect();
    let mut tx = pool.begin().await?;
    let written: Vec<(Uuid,)> = sqlx::query_as(AssertSqlSafe(format!(
        "WITH {locked} {SUCCEED}",
        locked = fenced_locked("$1", "$2", "$3"),
    )))
    .bind(&ids)
    .bind(&attempts)
    .bind(worker_id)
    .fetch_all(&mut *tx)
    .await?;
    let written: std::collections::HashSet<Uuid> = written.into_iter().map(|(id,)| id).collect();
    let done: Vec<&ClaimedJob> = jobs
        .iter()
        .copied()
        .filter(|j| written.contains(&j.id))
        .collect();
    update_pin_index(&mut tx, &done).await?;
    tx.commit().await?;
    Ok(done.iter().map(|j| j.id).collect())
}

/// Writes the records of attempts that just ended other than in success, one statement
/// for all. A record the claim opened under the old scheme is closed in place.
async fn record_attempts(
    conn: &mut PgConnection,
    jobs: &[&ClaimedJob],
    worker_id: Uuid,
    outcome: &str,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let attempts: Vec<i32> = jobs.iter().map(|j| j.attempt).collect();
    let started: Vec<DateTime<Utc>> = jobs.iter().map(|j| j.started_at).collect();
    sqlx::query(
        "INSERT INTO job_attempts (job_id, attempt, worker_id, started_at, finished_at, outcome, error)
         SELECT t.id, t.attempt, $4, t.started_at, now(), $5, $6
         FROM UNNEST($1::uuid[], $2::int4[], $3::timestamptz[]) AS t(id, attempt, started_at)
         ON CONFLICT (job_id, attempt) DO UPDATE
         SET finished_at = EXCLUDED.finished_at, outcome = EXCLUDED.outcome, error = EXCLUDED.error",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&started)
    .bind(worker_id)
    .bind(outcome)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// What one successful job changes in the pin index: the (backend, canonical CID) it
/// pinned, and the one it unpinned (see [`ClaimedJob::removes`]).
fn pin_changes(job: &ClaimedJob) -> PinChange {
    let op: Op = job.op.parse().unwrap_or(Op::Pin);
    let pinned = matches!(op, Op::Pin | Op::Replace).then(|| (job.backend_id, key_of(&job.cid)));
    (
        pinned,
        job.removes().map(|cid| (job.backend_id, key_of(cid))),
    )
}

/// Whether two of these changes touch the same pin.
fn has_conflict(changes: &[(&ClaimedJob, PinChange)]) -> bool {
    let mut seen = std::collections::HashSet::new();
    changes
        .iter()
        .flat_map(|(_, (p, r))| p.iter().chain(r.iter()))
        .any(|k| !seen.insert(k.clone()))
}

/// The pin-index changes of successful jobs: upserts for what they pinned, deletes for
/// what they unpinned, a few statements whatever their number. If two of them touch the
/// same pin, they are applied one job at a time in order instead, so the last one wins as
/// it would have alone.
async fn update_pin_index(
    conn: &mut PgConnection,
    jobs: &[&ClaimedJob],
) -> Result<(), sqlx::Error> {
    let changes: Vec<(&ClaimedJob, PinChange)> =
        jobs.iter().map(|j| (*j, pin_changes(j))).collect();
    if has_conflict(&changes) {
        for change in &changes {
            apply_pin_changes(conn, std::slice::from_ref(change)).await?;
        }
        return Ok(());
    }
    apply_pin_changes(conn, &changes).await
}

type PinChange = (Option<(Uuid, String)>, Option<(Uuid, String)>);

/// Pin-index changes whose keys are all distinct, as columns for `UNNEST`, each list
/// sorted by key so that two workers recording overlapping pins lock them in the same
/// order.
struct PinWrites {
    up_backends: Vec<Uuid>,
    up_cids: Vec<String>,
    up_owners: Vec<String>,
    up_names: Vec<Option<String>>,
    up_jobs: Vec<Uuid>,
    del_backends: Vec<Uuid>,
    del_cids: Vec<String>,
    del_jobs: Vec<Uuid>,
    del_owners: Vec<String>,
    /// The node kept the pin for other owners ([`ClaimedJob::others_hold`]): only this
    /// owner's reference goes, the row stays.
    del_kept: Vec<bool>,
}

impl PinWrites {
    /// The upsert, over parameters $1–$5; `{done}` is where a caller may join the rows
    /// that really were written. A pin adds its owner's reference. The row's `owner`,
    /// `name` and `job_id` are those of its first live reference: another owner's pin of
    /// the same content joins `others` and leaves them (a pin found outside pinq,
    /// `unmanaged`, has no reference and is taken over).
    const UPSERT: &str =
        "INSERT INTO pins (backend_id, cid, owner, name, job_id, status, pinned_at, verified_at)
         SELECT t.backend_id, t.cid, t.owner, t.name, t.job_id, 'pinned', now(), now()
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[])
              AS t(backend_id, cid, owner, name, job_id)
         {done}
         ORDER BY t.backend_id, t.cid
         ON CONFLICT (backend_id, cid) DO UPDATE
         SET others = CASE WHEN pins.owner IS NULL OR pins.owner = EXCLUDED.owner
                                OR EXCLUDED.owner = ANY (pins.others)
                           THEN pins.others ELSE array_append(pins.others, EXCLUDED.owner) END,
             owner = coalesce(pins.owner, EXCLUDED.owner),
             name = CASE WHEN pins.owner IS NULL OR pins.owner = EXCLUDED.owner
                         THEN EXCLUDED.name ELSE pins.name END,
             job_id = CASE WHEN pins.owner IS NULL OR pins.owner = EXCLUDED.owner
                           THEN EXCLUDED.job_id ELSE pins.job_id END,
             status = 'pinned', verified_at = now(), updated_at = now(),
             pinned_at = CASE WHEN pins.status = 'pinned' THEN pins.pinned_at ELSE now() END";

    /// The unpins the node did not carry out because other owners hold the pin: the
    /// job's owner's reference is removed, over five parameters from `$first` on
    /// (backends, CIDs, jobs, owners, kept), with a `done` join like the upsert's. If the
    /// row's first reference goes, the next one takes its place (its name and job are not
    /// known, so they are cleared). A row left with no reference (which jobs running in
    /// order on a pin do not leave) is still on the node: `unmanaged`.
    fn release_sql(first: usize, done: &str) -> String {
        let (b, c, j, o, k) = (first, first + 1, first + 2, first + 3, first + 4);
        format!(
            "UPDATE pins p
             SET owner = CASE WHEN p.owner = t.owner THEN p.others[1] ELSE p.owner END,
                 others = nullif(CASE WHEN p.owner = t.owner THEN p.others[2:]
                                      ELSE array_remove(p.others, t.owner) END, '{{}}'),
                 name = CASE WHEN p.owner = t.owner THEN NULL ELSE p.name END,
                 job_id = CASE WHEN p.owner = t.owner THEN NULL ELSE p.job_id END,
                 status = CASE WHEN p.owner = t.owner AND p.others IS NULL
                               THEN 'unmanaged' ELSE p.status END,
                 updated_at = now()
             FROM UNNEST(${b}::uuid[], ${c}::text[], ${j}::uuid[], ${o}::text[], ${k}::bool[])
                  AS t(backend_id, cid, job_id, owner, kept)
             {done}
             WHERE t.kept AND p.backend_id = t.backend_id AND p.cid = t.cid"
        )
    }

    /// The unpins the node carried out: the row goes, whoever else held it (an admin's
    /// unpin, or the last reference). Same parameters as [`Self::release_sql`].
    fn delete_sql(first: usize, done: &str) -> String {
        let (b, c, j, o, k) = (first, first + 1, first + 2, first + 3, first + 4);
        format!(
            "DELETE FROM pins p
             USING UNNEST(${b}::uuid[], ${c}::text[], ${j}::uuid[], ${o}::text[], ${k}::bool[])
                   AS t(backend_id, cid, job_id, owner, kept)
             {done}
             WHERE NOT t.kept AND p.backend_id = t.backend_id AND p.cid = t.cid"
        )
    }

    fn of(changes: &[(&ClaimedJob, PinChange)]) -> PinWrites {
        let mut upserts: Vec<(&ClaimedJob, &(Uuid, String))> = changes
            .iter()
            .filter_map(|(j, (p, _))| p.as_ref().map(|k| (*j, k)))
            .collect();
        upserts.sort_by(|a, b| a.1.cmp(b.1));
        let mut deletes: Vec<(&(Uuid, String), &ClaimedJob)> = changes
            .iter()
            .filter_map(|(j, (_, r))| r.as_ref().map(|k| (k, *j)))
            .collect();
        deletes.sort_by(|a, b| a.0.cmp(b.0).then(a.1.id.cmp(&b.1.id)));
        PinWrites {
            up_backends: upserts.iter().map(|(_, k)| k.0).collect(),
            up_cids: upserts.iter().map(|(_, k)| k.1.clone()).collect(),
            up_owners: upserts.iter().map(|(j, _)| j.owner.clone()).collect(),
            up_names: upserts.iter().map(|(j, _)| j.name.clone()).collect(),
            up_jobs: upserts.iter().map(|(j, _)| j.id).collect(),
            del_backends: deletes.iter().map(|(k, _)| k.0).collect(),
            del_cids: deletes.iter().map(|(k, _)| k.1.clone()).collect(),
            del_jobs: deletes.iter().map(|(_, j)| j.id).collect(),
            del_owners: deletes.iter().map(|(_, j)| j.owner.clone()).collect(),
            del_kept: deletes.iter().map(|(_, j)| !j.unpins_on_node()).collect(),
        }
    }
}

/// Writes pin-index changes whose keys are all distinct: up to three statements.
async fn apply_pin_changes(
    conn: &mut PgConnection,
    changes: &[(&ClaimedJob, PinChange)],
) -> Result<(), sqlx::Error> {
    let w = PinWrites::of(changes);
    if !w.up_jobs.is_empty() {
        sqlx::query(AssertSqlSafe(PinWrites::UPSERT.replace("{done}", "")))
            .bind(&w.up_backends)
            .bind(&w.up_cids)
            .bind(&w.up_owners)
            .bind(&w.up_names)
            .bind(&w.up_jobs)
            .execute(&mut *conn)
            .await?;
    }
    let kept = w.del_kept.iter().filter(|k| **k).count();
    let statements = [
        (kept > 0).then(|| PinWrites::release_sql(1, "")),
        (kept < w.del_kept.len()).then(|| PinWrites::delete_sql(1, "")),
    ];
    for sql in statements.into_iter().flatten() {
        sqlx::query(AssertSqlSafe(sql))
            .bind(&w.del_backends)
            .bind(&w.del_cids)
            .bind(&w.del_jobs)
            .bind(&w.del_owners)
            .bind(&w.del_kept)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Relay side

/// A job the relay must publish.
#[derive(Debug, Clone, Copy, FromRow)]
pub struct DueJob {
    pub id: Uuid,
    pub priority: i16,
}

/// Which jobs a relay pass moves back to `queued` (and owes a message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayScan {
    /// Retries whose `retry_at` has come.
    DueRetries,
    /// Running jobs whose claim's lease expired: the worker is presumed dead. Claims whose
    /// jobs have all finished are deleted by the same scan once their lease runs out.
    ExpiredLeases,
    /// Parked jobs (see [`claim_jobs`]) whose blocker has ended, one page at a time: up to
    /// the scan's limit of parked jobs, in the order of their blockers' ids after `after`,
    /// plus any others parked behind the page's last blocker. A pass costs what one page
    /// costs, however many jobs are parked; [`RelayTake::resume_after`] says where the
    /// next page starts. One still behind another job is parked again by its next claim.
    Unblocked { after: Uuid },
}

/// What a relay scan locked: how many rows it took (jobs, or claims for
/// [`RelayScan::ExpiredLeases`]; a full take means more may be waiting) and the jobs to
/// move back to `queued`.
#[derive(Debug, Default)]
pub struct RelayTake {
    pub taken: usize,
    pub jobs: Vec<DueJob>,
    /// For [`RelayScan::Unblocked`]: the blocker id the next page starts after, or `None`
    /// when this page was the last and the next one starts from the beginning.
    pub resume_after: Option<Uuid>,
}

/// Locks up to `limit` rows of a relay scan (`FOR UPDATE SKIP LOCKED`, so several relays
/// share the work). For expired leases the claims are deleted in the caller's
/// transaction and their jobs still running under them are locked. See
/// `pinq_scheduler::Relay` for what follows.
pub async fn relay_lock_due(
    conn: &mut PgConnection,
    scan: RelayScan,
    limit: i64,
) -> Result<RelayTake, sqlx::Error> {
    let sql = match scan {
        RelayScan::DueRetries => {
            "SELECT j.id, j.priority FROM jobs j
             WHERE j.retry_at <= now() AND j.state = 'retry_wait'
               -- Jobs for a backend the health checks hold down wait without spending
               -- attempts; they are published once it is back.
               AND NOT EXISTS (SELECT 1 FROM backends b
                               WHERE b.id = j.backend_id AND b.status = 'down')
             ORDER BY j.retry_at LIMIT $1 FOR UPDATE OF j SKIP LOCKED"
        }
        RelayScan::Unblocked { after } => return lock_unblocked(conn, after, limit).await,
        RelayScan::ExpiredLeases => return lock_expired_claims(conn, limit).await,
    };
    let jobs: Vec<DueJob> = sqlx::query_as(sql).bind(limit).fetch_all(conn).await?;
    Ok(RelayTake {
        taken: jobs.len(),
        jobs,
        resume_after: None,
    })
}

/// [`relay_lock_due`] for [`RelayScan::Unblocked`]: one page of parked jobs, read in
/// `jobs_blocked` order (by the id of the job each waits for) after `after`, and of those
/// the ones their blocker no longer holds: it has ended, or it waits again and was
/// submitted after them. The page ends on a whole blocker, so jobs parked
/// behind one job are never split between two pages.
async fn lock_unblocked(
    conn: &mut PgConnection,
    after: Uuid,
    limit: i64,
) -> Result<RelayTake, sqlx::Error> {
    let page = |after: Uuid| {
        sqlx::query_as::<_, (Option<Uuid>, i64)>(
            "WITH page AS (
                 SELECT blocked_by FROM jobs
                 WHERE blocked_by IS NOT NULL AND blocked_by > $1
                 ORDER BY blocked_by LIMIT $2
             )
             SELECT (SELECT blocked_by FROM page ORDER BY blocked_by DESC LIMIT 1),
                    (SELECT count(*) FROM page)",
        )
        .bind(after)
        .bind(limit)
    };
    let mut after = after;
    let (mut upto, mut seen) = page(after).fetch_one(&mut *conn).await?;
    if upto.is_none() && !after.is_nil() {
        // Past the last page (the one before it was full): start again at the first.
        after = Uuid::nil();
        (upto, seen) = page(after).fetch_one(&mut *conn).await?;
    }
    let Some(upto) = upto else {
        return Ok(RelayTake::default());
    };
    let jobs: Vec<DueJob> = sqlx::query_as(
        "SELECT j.id, j.priority FROM jobs j
         WHERE j.blocked_by IS NOT NULL AND j.blocked_by > $1 AND j.blocked_by <= $2
           AND j.state = 'retry_wait'
           -- Still parked only while the claim would park it again: its blocker runs, or
           -- waits and was submitted before it. A later blocker that went back to wait
           -- without finishing (a retry, a deferral, a lost lease) no longer holds it, so
           -- two jobs never wait for each other.
           AND NOT EXISTS (SELECT 1 FROM jobs b WHERE b.id = j.blocked_by
                           AND (b.state = 'running'
                                OR (b.state IN ('queued', 'retry_wait')
                                    AND b.submit_seq < j.submit_seq)))
         ORDER BY j.submit_seq FOR UPDATE OF j SKIP LOCKED",
    )
    .bind(after)
    .bind(upto)
    .fetch_all(&mut *conn)
    .await?;
    Ok(RelayTake {
        taken: jobs.len(),
        jobs,
        resume_after: (seen >= limit).then_some(upto),
    })
}

/// [`relay_lock_due`] for [`RelayScan::ExpiredLeases`].
async fn lock_expired_claims(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<RelayTake, sqlx::Error> {
    // A claim is locked only while its lease has run out (re-checked on the row's
    // newest version, so a lease the worker has just extended is left alone), and
    // deleted: from then on its worker's extensions find nothing and stop its jobs.
    let claims: Vec<(i64, Vec<Uuid>)> = sqlx::query_as(
        "DELETE FROM job_claims WHERE id IN (
             SELECT id FROM job_claims WHERE lease_until < now()
             ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING id, job_ids",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    if claims.is_empty() {
        return Ok(RelayTake::default());
    }
    let claim_ids: Vec<i64> = claims.iter().map(|(id, _)| *id).collect();
    let job_ids: Vec<Uuid> = claims.into_iter().flat_map(|(_, jobs)| jobs).collect();
    // Most claims are of jobs that finished long ago: only those still running
    // under the claim (not finished, not handed back and claimed again) are taken.
    let jobs = sqlx::query_as(
        "SELECT id, priority FROM jobs
         WHERE id = ANY($1) AND claim_id = ANY($2) AND state = 'running'
         ORDER BY id FOR UPDATE",
    )
    .bind(&job_ids)
    .bind(&claim_ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(RelayTake {
        taken: claim_ids.len(),
        jobs,
        resume_after: None,
    })
}

/// Moves jobs locked by [`relay_lock_due`] (back) to `queued` and owes their messages in
/// the dispatch outbox, in the caller's transaction. An expired lease's attempt is
/// recorded as lost. A job whose cancellation was requested while it ran (its worker died
/// before it could stop it) ends `cancelled` instead, and is owed no message: a queued
/// job never has a cancel request pending. Returns how many jobs ended `cancelled`. The
/// caller commits before anything is published: a claim never waits on a row whose
/// committed state does not match, so a message that reached a worker before the commit
/// would be dropped.
pub async fn relay_requeue(
    conn: &mut PgConnection,
    scan: RelayScan,
    ids: &[Uuid],
) -> Result<usize, sqlx::Error> {
    if scan == RelayScan::ExpiredLeases {
        sqlx::query(
            "INSERT INTO job_attempts (job_id, attempt, worker_id, started_at, finished_at, outcome, error)
             SELECT id, attempt, lease_owner, coalesce(started_at, now()), now(),
                    CASE WHEN cancel_requested THEN 'cancelled' ELSE 'lost' END,
                    CASE WHEN cancel_requested
                         THEN 'cancelled by request; the lease expired before the worker stopped the job'
                         ELSE 'lease expired: worker presumed dead' END
             FROM jobs WHERE id = ANY($1) AND state = 'running'
             ON CONFLICT (job_id, attempt) DO UPDATE
             SET finished_at = EXCLUDED.finished_at, outcome = EXCLUDED.outcome, error = EXCLUDED.error
             WHERE job_attempts.outcome IS NULL",
        )
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    }
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "UPDATE jobs SET state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
                finished_at = CASE WHEN cancel_requested THEN now() END,
                lease_owner = NULL, retry_at = NULL, blocked_by = NULL,
                updated_at = now(),
                last_error = CASE WHEN cancel_requested THEN 'cancelled by request'
                                  WHEN state = 'running'
                                  THEN 'lease expired: worker presumed dead'
                                  WHEN blocked_by IS NOT NULL THEN NULL
                                  ELSE last_error END
         WHERE id = ANY($1)
         RETURNING id, state",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let queued: Vec<Uuid> = rows
        .iter()
        .filter_map(|(id, state)| (state == "queued").then_some(*id))
        .collect();
    if !queued.is_empty() {
        owe_dispatch(conn, &queued, false).await?;
    }
    Ok(rows.len() - queued.len())
}

/// The safety net for messages lost in the broker (a purged queue): outbox entries
/// published more than `after` ago are checked. Those with jobs still queued are owed
/// again, for those jobs only (the relay publishes them next; duplicates are harmless
/// because claims are fenced); those without are deleted, which is how published entries
/// leave the outbox. Returns (entries checked, jobs owed again).
pub async fn relay_reowe_stale(
    conn: &mut PgConnection,
    after: Duration,
    limit: i64,
) -> Result<(usize, usize), sqlx::Error> {
    let (checked, owed): (i64, i64) = sqlx::query_as(
        "WITH e AS (
             SELECT id, job_ids FROM dispatch_outbox
             WHERE published_at < now() - make_interval(secs => $2)
             ORDER BY published_at LIMIT $1 FOR UPDATE SKIP LOCKED
         ), q AS (
             SELECT e.id, array_agg(j.id ORDER BY j.id) AS job_ids
             FROM e CROSS JOIN LATERAL unnest(e.job_ids) AS u(id)
             JOIN jobs j ON j.id = u.id
             WHERE j.state = 'queued' AND NOT j.cancel_requested
             GROUP BY e.id
         ), gone AS (
             DELETE FROM dispatch_outbox d USING e
             WHERE d.id = e.id AND NOT EXISTS (SELECT 1 FROM q WHERE q.id = e.id)
         ), again AS (
             UPDATE dispatch_outbox d
             SET job_ids = q.job_ids, published_at = NULL, self_publishing = false
             FROM q WHERE d.id = q.id
         )
         SELECT (SELECT count(*) FROM e),
                (SELECT coalesce(sum(cardinality(job_ids)), 0) FROM q)::int8",
    )
    .bind(limit)
    .bind(after.as_secs_f64())
    .fetch_one(conn)
    .await?;
    Ok((checked as usize, owed as usize))
}

/// Dispatch-outbox entries the relay publishes now: those nobody else is publishing, and
/// those whose writer was to publish them itself but has not settled them within `grace`.
/// Locked (`FOR UPDATE SKIP LOCKED`) until the caller's transaction ends, so two relays
/// never publish the same entry at once. Returns the entries' ids and their jobs that are
/// still `queued`, most urgent first.
pub async fn relay_take_owed(
    conn: &mut PgConnection,
    grace: Duration,
    limit: i64,
) -> Result<(Vec<i64>, Vec<DueJob>), sqlx::Error> {
    let entries: Vec<(i64,)> = sqlx::query_as(
        "SELECT id FROM dispatch_outbox
         WHERE published_at IS NULL
           AND (NOT self_publishing OR created_at < now() - make_interval(secs => $2))
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(grace.as_secs_f64())
    .fetch_all(&mut *conn)
    .await?;
    let entries: Vec<i64> = entries.into_iter().map(|(id,)| id).collect();
    if entries.is_empty() {
        return Ok((entries, Vec::new()));
    }
    let jobs = sqlx::query_as(
        "SELECT j.id, j.priority FROM jobs j
         WHERE j.id IN (SELECT unnest(job_ids) FROM dispatch_outbox WHERE id = ANY($1))
           AND j.state = 'queued'
         ORDER BY j.priority DESC, j.id",
    )
    .bind(&entries)
    .fetch_all(&mut *conn)
    .await?;
    Ok((entries, jobs))
}

/// Marks outbox entries whose messages the broker has confirmed as published (see
/// [`relay_reowe_stale`] for when they leave).
pub async fn relay_settle(conn: &mut PgConnection, entries: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE dispatch_outbox SET published_at = now() WHERE id = ANY($1)")
        .bind(entries)
        .execute(conn)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reads for the API

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StateCounts {
    pub queued: i64,
    pub running: i64,
    pub retry_wait: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl StateCounts {
    /// A batch is done when none of its jobs can still change by itself.
    pub fn is_done(&self) -> bool {
        self.queued == 0 && self.running == 0 && self.retry_wait == 0
    }

    fn add(&mut self, state: &str, n: i64) {
        match state.parse::<JobState>() {
            Ok(JobState::Queued) => self.queued += n,
            Ok(JobState::Running) => self.running += n,
            Ok(JobState::RetryWait) => self.retry_wait += n,
            Ok(JobState::Succeeded) => self.succeeded += n,
            Ok(JobState::Failed) => self.failed += n,
            Ok(JobState::Cancelled) => self.cancelled += n,
            Err(_) => {}
        }
    }
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct BatchRow {
    pub id: Uuid,
    pub owner: String,
    pub priority: i16,
    pub backends: Vec<String>,
    pub retry: sqlx::types::Json<Value>,
    pub idempotency_key: Option<String>,
    pub job_count: i32,
    pub created_at: DateTime<Utc>,
}

/// A batch visible to `owner` (`None`: any owner, for admins).
pub async fn get_batch(
    pool: &PgPool,
    id: Uuid,
    owner: Option<&str>,
) -> Result<Option<BatchRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, owner, priority, backends, retry, idempotency_key, job_count, created_at
         FROM batches WHERE id = $1 AND ($2::text IS NULL OR owner = $2)",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await
}

/// The newest batches visible to `owner` (`None`: all), newest first.
pub async fn list_batches(
    pool: &PgPool,
    owner: Option<&str>,
    limit: i64,
) -> Result<Vec<BatchRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, owner, priority, backends, retry, idempotency_key, job_count, created_at
         FROM batches WHERE ($1::text IS NULL OR owner = $1)
         ORDER BY created_at DESC, id LIMIT $2",
    )
    .bind(owner)
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn batch_counts(pool: &PgPool, id: Uuid) -> Result<StateCounts, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs WHERE batch_id = $1 GROUP BY state")
            .bind(id)
            .fetch_all(pool)
            .await?;
    let mut counts = StateCounts::default();
    for (state, n) in rows {
        counts.add(&state, n);
    }
    Ok(counts)
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct JobRow {
    pub id: Uuid,
    pub batch_id: Uuid,
    pub seq: i32,
    pub owner: String,
    pub backend: String,
    pub op: String,
    pub cid: String,
    pub replaces_cid: Option<String>,
    pub name: Option<String>,
    pub meta: sqlx::types::Json<Value>,
    pub priority: i16,
    pub state: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub lease_owner: Option<Uuid>,
    pub lease_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// While the job is parked behind an earlier job on its CID and backend: that job.
    pub waiting_for: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub(crate) const JOB_COLUMNS: &str =
    "j.id, j.batch_id, j.seq, j.owner, b.name AS backend, j.op, j.cid,
    j.replaces_cid, j.name, j.meta, j.priority, j.state, j.attempt, j.max_attempts, j.run_at,
    j.lease_owner,
    (SELECT c.lease_until FROM job_claims c WHERE c.id = j.claim_id AND j.state = 'running')
        AS lease_until,
    j.last_error, CASE WHEN j.state = 'retry_wait' THEN j.blocked_by END AS waiting_for,
    j.created_at, j.updated_at,
    j.started_at, j.finished_at";

/// One page of a batch's jobs in submission order, after the cursor `(seq, id)`.
pub async fn batch_jobs(
    pool: &PgPool,
    batch_id: Uuid,
    after: Option<(i32, Uuid)>,
    state: Option<JobState>,
    limit: i64,
) -> Result<Vec<JobRow>, sqlx::Error> {
    let (after_seq, after_id) = after.unzip();
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs j JOIN backends b ON b.id = j.backend_id
         WHERE j.batch_id = $1
           AND ($2::int4 IS NULL OR (j.seq, j.id) > ($2, $3))
           AND ($4::text IS NULL OR j.state = $4)
         ORDER BY j.seq, j.id
         LIMIT $5"
    )))
    .bind(batch_id)
    .bind(after_seq)
    .bind(after_id)
    .bind(state.map(JobState::as_str))
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn get_job(
    pool: &PgPool,
    id: Uuid,
    owner: Option<&str>,
) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs j JOIN backends b ON b.id = j.backend_id
         WHERE j.id = $1 AND ($2::text IS NULL OR j.owner = $2)"
    )))
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct AttemptRow {
    pub attempt: i32,
    pub worker_id: Uuid,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub error: Option<String>,
}

/// A job's attempts: their records, and from the job's row the running attempt (which has
/// no record until it ends) and the successful one (whose record is the row).
pub async fn job_attempts(pool: &PgPool, job_id: Uuid) -> Result<Vec<AttemptRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT attempt, worker_id, started_at, finished_at, outcome, error
         FROM job_attempts WHERE job_id = $1
         UNION ALL
         SELECT j.attempt, j.lease_owner, j.started_at, NULL, NULL, NULL FROM jobs j
         WHERE j.id = $1 AND j.state = 'running'
           AND NOT EXISTS (SELECT 1 FROM job_attempts a
                           WHERE a.job_id = j.id AND a.attempt = j.attempt)
         UNION ALL
         SELECT j.attempt, j.succeeded_by, j.started_at, j.finished_at, 'succeeded', NULL
         FROM jobs j
         WHERE j.id = $1 AND j.state = 'succeeded' AND j.succeeded_by IS NOT NULL
         ORDER BY attempt",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await
}

// ---------------------------------------------------------------------------------------
// Workers

pub async fn register_worker(
    pool: &PgPool,
    id: Uuid,
    host: &str,
    pid: u32,
    concurrency: usize,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO workers (id, host, pid, concurrency) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET last_heartbeat = now(), state = 'running'",
    )
    .bind(id)
    .bind(host)
    .bind(pid as i32)
    .bind(concurrency as i32)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn heartbeat(
    pool: &PgPool,
    id: Uuid,
    in_flight: usize,
    state: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE workers SET last_heartbeat = now(), in_flight = $2, state = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(in_flight as i32)
    .bind(state)
    .execute(pool)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Cancel and re-drive

/// What a cancel request did to one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelResult {
    /// It had not started: it is now `cancelled`.
    Cancelled,
    /// It is running: its worker was asked to stop it.
    Requested,
    /// It had already finished; nothing changed.
    AlreadyFinished,
}

/// Cancels a job visible to `owner`. `None`: no such job.
pub async fn cancel_job(
    pool: &PgPool,
    id: Uuid,
    owner: Option<&str>,
) -> Result<Option<CancelResult>, sqlx::Error> {
    let row: Option<(String,)> = sqlx::query_as(
        "WITH target AS (
             SELECT id, state FROM jobs
             WHERE id = $1 AND ($2::text IS NULL OR owner = $2)
             FOR UPDATE
         ), upd AS (
             UPDATE jobs j
             SET state = CASE WHEN t.state IN ('queued', 'retry_wait') THEN 'cancelled' ELSE j.state END,
                 finished_at = CASE WHEN t.state IN ('queued', 'retry_wait') THEN now() ELSE j.finished_at END,
                 cancel_requested = (t.state = 'running') OR j.cancel_requested,
                 retry_at = NULL, blocked_by = NULL, updated_at = now()
             FROM target t WHERE j.id = t.id AND t.state IN ('queued', 'retry_wait', 'running')
         )
         SELECT state FROM target",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(state,)| match state.as_str() {
        "queued" | "retry_wait" => CancelResult::Cancelled,
        "running" => CancelResult::Requested,
        _ => CancelResult::AlreadyFinished,
    }))
}

/// Counts of what cancelling a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BatchCancel {
    pub cancelled: i64,
    pub requested: i64,
}

/// Cancels every job of a batch that has not finished. The caller checked the batch is
/// visible to the caller.
pub async fn cancel_batch(pool: &PgPool, batch_id: Uuid) -> Result<BatchCancel, sqlx::Error> {
    // One statement, locking the rows in id order like the hot-path writers of jobs.
    let rows: Vec<(bool,)> = sqlx::query_as(
        "WITH target AS (
             SELECT id FROM jobs
             WHERE batch_id = $1 AND state IN ('queued', 'retry_wait', 'running')
             ORDER BY id FOR UPDATE
         )
         UPDATE jobs j
         SET state = CASE WHEN j.state = 'running' THEN j.state ELSE 'cancelled' END,
             finished_at = CASE WHEN j.state = 'running' THEN j.finished_at ELSE now() END,
             cancel_requested = j.cancel_requested OR j.state = 'running',
             retry_at = NULL, blocked_by = NULL, updated_at = now()
         FROM target WHERE j.id = target.id
         RETURNING j.state = 'running'",
    )
    .bind(batch_id)
    .fetch_all(pool)
    .await?;
    let requested = rows.iter().filter(|(running,)| *running).count() as i64;
    Ok(BatchCancel {
        cancelled: rows.len() as i64 - requested,
        requested,
    })
}

/// Re-drives failed (dead-lettered) jobs: back to `queued` with a fresh attempt budget (the
/// batch's `max_attempts` more attempts). Either one job (`job`) or all failed jobs of a
/// batch (`batch`), limited to `owner`'s. Returns the jobs to publish (`None`: nothing was
/// failed).
pub async fn redrive_failed(
    pool: &PgPool,
    job: Option<Uuid>,
    batch: Option<Uuid>,
    owner: Option<&str>,
) -> Result<Option<Owed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, i16)> = sqlx::query_as(
        "WITH target AS (
             SELECT j.id, coalesce((b.retry->>'max_attempts')::int, j.max_attempts) AS budget
             FROM jobs j JOIN batches b ON b.id = j.batch_id
             WHERE j.state = 'failed'
               AND ($1::uuid IS NULL OR j.id = $1)
               AND ($2::uuid IS NULL OR j.batch_id = $2)
               AND ($3::text IS NULL OR j.owner = $3)
             ORDER BY j.id FOR UPDATE OF j
         )
         UPDATE jobs j
         SET state = 'queued', finished_at = NULL, cancel_requested = false,
             max_attempts = j.attempt + target.budget, run_at = now(), updated_at = now()
         FROM target
         WHERE j.id = target.id AND j.state = 'failed'
         RETURNING j.id, j.priority",
    )
    .bind(job)
    .bind(batch)
    .bind(owner)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(None);
    }
    let ids: Vec<Uuid> = rows.iter().map(|(id, _)| *id).collect();
    let entry = owe_dispatch(&mut tx, &ids, true).await?;
    tx.commit().await?;
    Ok(Some(Owed {
        entry,
        jobs: rows
            .into_iter()
            .map(|(id, p)| (id, Priority::new(i64::from(p)).unwrap_or_default()))
            .collect(),
    }))
}

// ---------------------------------------------------------------------------------------
// The worker fleet

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct WorkerRow {
    pub id: Uuid,
    pub host: String,
    pub pid: i32,
    pub concurrency: i32,
    pub in_flight: i32,
    pub state: String,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    /// Jobs this worker holds the lease on right now.
    pub running_jobs: i64,
}

/// Every worker that has not stopped, and those that stopped or were lost in the last hour.
pub async fn list_workers(pool: &PgPool) -> Result<Vec<WorkerRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT w.id, w.host, w.pid, w.concurrency, w.in_flight, w.state, w.started_at,
                w.last_heartbeat,
                (SELECT count(*) FROM job_claims c
                 CROSS JOIN LATERAL unnest(c.job_ids) AS u(id)
                 JOIN jobs j ON j.id = u.id
                 WHERE c.worker_id = w.id AND j.claim_id = c.id AND j.state = 'running')
                    AS running_jobs
         FROM workers w
         WHERE w.state IN ('running', 'stopping') OR w.last_heartbeat > now() - interval '1 hour'
         ORDER BY w.started_at",
    )
    .fetch_all(pool)
    .await
}

/// Folds the job tallies of database sessions that have ended into one row per owner and
/// state, and deletes per-second finishes older than two minutes (`pinq_fold_job_tallies`
/// in the `job_tallies` migration). Returns how many rows were folded. It gives up rather
/// than wait long for a lock (another scheduler folding, a truncate of `jobs`): the relay
/// that calls it must get on with publishing.
pub async fn fold_job_tallies(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT set_config('lock_timeout', '1s', true),
                set_config('statement_timeout', '10s', true)",
    )
    .execute(&mut *tx)
    .await?;
    let (folded,): (i64,) = sqlx::query_as("SELECT pinq_fold_job_tallies()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(folded)
}

/// Marks workers whose heartbeat is older than `stale` as lost, and expires the leases of
/// their claims so the relay takes their running jobs back at once instead of waiting out
/// the lease. Returns (workers marked lost, claims expired).
pub async fn reap_lost_workers(pool: &PgPool, stale: Duration) -> Result<(u64, u64), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let lost: Vec<(Uuid,)> = sqlx::query_as(
        "UPDATE workers SET state = 'lost'
         WHERE state IN ('running', 'stopping')
           AND last_heartbeat < now() - make_interval(secs => $1)
         RETURNING id",
    )
    .bind(stale.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = lost.into_iter().map(|(id,)| id).collect();
    let released = if ids.is_empty() {
        0
    } else {
        sqlx::query(
            "UPDATE job_claims SET lease_until = now() - interval '1 second'
             WHERE worker_id = ANY($1) AND lease_until >= now()",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected()
    };
    tx.commit().await?;
    Ok((ids.len() as u64, released))
}
