//! The operator's read side: queries behind `GET /v1/stats`, `GET /v1/jobs`,
//! `GET /v1/pin-index`, and the backend admin actions (`DELETE /v1/backends/{name}`,
//! `POST /v1/backends/{name}/check`) that the `pinq` CLI uses.
//!
//! Every query that shows jobs takes an owner filter: `None` lets an admin see every
//! tenant's jobs, `Some(owner)` keeps a tenant to its own.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{AssertSqlSafe, FromRow, PgPool};
use uuid::Uuid;

use crate::db::JobRow;
use crate::model::JobState;

/// Jobs per state.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct JobCounts {
    pub queued: i64,
    pub running: i64,
    pub retry_wait: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

/// Recent throughput and latency, measured on `finished_at`.
#[derive(Debug, Clone, Default, Serialize, FromRow, PartialEq)]
pub struct Recent {
    pub succeeded_10s: i64,
    pub failed_10s: i64,
    pub succeeded_60s: i64,
    pub failed_60s: i64,
    /// Submit→done latency (finished_at − created_at) over jobs finished in the last
    /// 60 s, in milliseconds; `None` when no job finished.
    pub latency_p50_ms: Option<f64>,
    pub latency_p90_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub latency_samples: i64,
}

pub async fn job_counts(pool: &PgPool, owner: Option<&str>) -> Result<JobCounts, sqlx::Error> {
    // A tenant's jobs are found through its batches (see `list_jobs`).
    let rows: Vec<(String, i64)> = match owner {
        None => {
            sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
                .fetch_all(pool)
                .await?
        }
        Some(owner) => {
            sqlx::query_as(
                "SELECT j.state, count(*) FROM batches bt JOIN jobs j ON j.batch_id = bt.id
                 WHERE bt.owner = $1 GROUP BY j.state",
            )
            .bind(owner)
            .fetch_all(pool)
            .await?
        }
    };
    let mut c = JobCounts::default();
    for (state, n) in rows {
        match state.parse::<JobState>() {
            Ok(JobState::Queued) => c.queued += n,
            Ok(JobState::Running) => c.running += n,
            Ok(JobState::RetryWait) => c.retry_wait += n,
            Ok(JobState::Succeeded) => c.succeeded += n,
            Ok(JobState::Failed) => c.failed += n,
            Ok(JobState::Cancelled) => c.cancelled += n,
            Err(_) => {}
        }
    }
    Ok(c)
}

/// Completions in the last 10 s and 60 s and the latency percentiles of the last 60 s.
pub async fn recent(pool: &PgPool, owner: Option<&str>) -> Result<Recent, sqlx::Error> {
    sqlx::query_as(
        "WITH f AS (
             SELECT j.state, j.finished_at,
                    extract(epoch FROM (j.finished_at - j.created_at)) * 1000.0 AS ms
             FROM jobs j
             WHERE j.state IN ('succeeded', 'failed')
               AND j.finished_at > now() - interval '60 seconds'
               AND ($1::text IS NULL
                    OR j.batch_id IN (SELECT bt.id FROM batches bt WHERE bt.owner = $1))
         )
         SELECT
             count(*) FILTER (WHERE state = 'succeeded' AND finished_at > now() - interval '10 seconds') AS succeeded_10s,
             count(*) FILTER (WHERE state = 'failed' AND finished_at > now() - interval '10 seconds') AS failed_10s,
             count(*) FILTER (WHERE state = 'succeeded') AS succeeded_60s,
             count(*) FILTER (WHERE state = 'failed') AS failed_60s,
             (percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::float8 AS latency_p50_ms,
             (percentile_cont(0.9) WITHIN GROUP (ORDER BY ms))::float8 AS latency_p90_ms,
             (percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::float8 AS latency_p99_ms,
             max(ms)::float8 AS latency_max_ms,
             count(*) AS latency_samples
         FROM f",
    )
    .bind(owner)
    .fetch_one(pool)
    .await
}

/// Which jobs `GET /v1/jobs` lists.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub owner: Option<String>,
    pub state: Option<JobState>,
    pub batch: Option<Uuid>,
    /// Keys (`jobs.cid_key`) of one CID to match: its canonical form, which finds every
    /// spelling it was submitted in, and its own spelling (`Qm…` for a CIDv0), the key of
    /// jobs stored before keys were canonical.
    pub cids: Vec<String>,
    /// Cursor: the `(created_at, id)` of the last job of the previous page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

use crate::db::JOB_COLUMNS;

/// Jobs matching the filter, newest first: by creation time, then id.
///
/// The jobs are found through their batches. A job's owner and creation time are its
/// batch's (a batch and its jobs are inserted in one transaction, so they share its
/// `now()`), so a tenant's newest jobs are in its newest batches: `batches_owner_created`
/// (or `batches_created` for an admin) gives the batches newest first, `jobs_batch_seq`
/// their jobs, and the scan stops after the batch that fills the page (a batch's jobs
/// share its creation time, so each batch's are sorted by id). `jobs` needs no index of
/// its own on owner or time, which every submitted job would pay for.
///
/// Only the filters given are in the statement, so each combination gets a plan of its
/// own rather than one generic plan that must serve them all.
pub async fn list_jobs(pool: &PgPool, f: &JobFilter) -> Result<Vec<JobRow>, sqlx::Error> {
    let mut conds: Vec<String> = Vec::new();
    let mut n = 0;
    let mut param = || {
        n += 1;
        format!("${n}")
    };
    if f.owner.is_some() {
        conds.push(format!("bt.owner = {}", param()));
    }
    if f.state.is_some() {
        conds.push(format!("j.state = {}", param()));
    }
    if f.batch.is_some() {
        conds.push(format!("bt.id = {}", param()));
    }
    if !f.cids.is_empty() {
        conds.push(format!("j.cid_key = ANY({})", param()));
    }
    if f.after.is_some() {
        let (at, id) = (param(), param());
        // The first bound lets the batch index start at the cursor; the second is exact.
        conds.push(format!("bt.created_at <= {at}"));
        conds.push(format!("(bt.created_at, j.id) < ({at}, {id})"));
    }
    let limit = param();
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    let mut q = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS}
         FROM batches bt
         JOIN jobs j ON j.batch_id = bt.id
         JOIN backends b ON b.id = j.backend_id
         {filter}
         ORDER BY bt.created_at DESC, j.id DESC
         LIMIT {limit}"
    )));
    if let Some(owner) = &f.owner {
        q = q.bind(owner);
    }
    if let Some(state) = f.state {
        q = q.bind(state.as_str());
    }
    if let Some(batch) = f.batch {
        q = q.bind(batch);
    }
    if !f.cids.is_empty() {
        q = q.bind(&f.cids);
    }
    if let Some((at, id)) = f.after {
        q = q.bind(at).bind(id);
    }
    q.bind(f.limit).fetch_all(pool).await
}

/// One row of the pin index.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct PinRow {
    pub backend: String,
    pub cid: String,
    /// The owner of the row's first live reference (for a tenant: the tenant itself).
    pub owner: Option<String>,
    /// Every owner holding a reference to the pin (for a tenant: only itself).
    pub owners: Vec<String>,
    pub name: Option<String>,
    pub job_id: Option<Uuid>,
    pub status: String,
    pub pinned_at: DateTime<Utc>,
    pub verified_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default)]
pub struct PinFilter {
    pub owner: Option<String>,
    pub backend: Option<String>,
    /// Canonical CID.
    pub cid: Option<String>,
    pub status: Option<String>,
    /// Cursor: the `(backend, cid)` of the last row of the previous page.
    pub after: Option<(String, String)>,
    pub limit: i64,
}

/// Pin index rows, ordered by backend name then CID. With `owner` set (a tenant's view),
/// the rows it holds a reference to, showing no other owner: the name and job of a row
/// another owner pinned first are left out.
pub async fn list_pins(pool: &PgPool, f: &PinFilter) -> Result<Vec<PinRow>, sqlx::Error> {
    let (after_backend, after_cid) = f.after.clone().unzip();
    sqlx::query_as(
        "SELECT b.name AS backend, p.cid,
                CASE WHEN $1::text IS NULL THEN p.owner ELSE $1 END AS owner,
                CASE WHEN $1::text IS NOT NULL THEN ARRAY[$1]
                     WHEN p.owner IS NULL THEN '{}'
                     ELSE ARRAY[p.owner] || coalesce(p.others, '{}') END AS owners,
                CASE WHEN $1::text IS NULL OR p.owner = $1 THEN p.name END AS name,
                CASE WHEN $1::text IS NULL OR p.owner = $1 THEN p.job_id END AS job_id,
                p.status, p.pinned_at, p.verified_at, p.updated_at
         FROM pins p JOIN backends b ON b.id = p.backend_id
         WHERE ($1::text IS NULL OR p.owner = $1 OR $1 = ANY (p.others))
           AND ($2::text IS NULL OR b.name = $2)
           AND ($3::text IS NULL OR p.cid = $3)
           AND ($4::text IS NULL OR p.status = $4)
           AND ($5::text IS NULL OR (b.name, p.cid) > ($5, $6))
         ORDER BY b.name, p.cid
         LIMIT $7",
    )
    .bind(f.owner.as_deref())
    .bind(f.backend.as_deref())
    .bind(f.cid.as_deref())
    .bind(f.status.as_deref())
    .bind(after_backend)
    .bind(after_cid)
    .bind(f.limit)
    .fetch_all(pool)
    .await
}

/// What [`delete_backend`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendDelete {
    NotFound,
    /// The backend still has jobs that may run; nothing was deleted.
    Busy {
        unfinished: i64,
    },
    /// The backend has finished jobs (their history) and `purge` was not asked for;
    /// nothing was deleted.
    HasHistory {
        finished: i64,
    },
    /// Deleted, with its finished jobs (their history) and its pin index rows.
    Deleted {
        jobs_removed: u64,
    },
}

/// Deletes a backend that has no unfinished job. If it has finished jobs, they are
/// deleted with it only when `purge` is set (the jobs table references the backend, and a
/// job's history is worth keeping unless the operator says otherwise). Its pin index rows
/// and probes cascade.
pub async fn delete_backend(
    pool: &PgPool,
    name: &str,
    purge: bool,
) -> Result<BackendDelete, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let id: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM backends WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((id,)) = id else {
        tx.rollback().await?;
        return Ok(BackendDelete::NotFound);
    };
    let (unfinished,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs
         WHERE backend_id = $1 AND state IN ('queued', 'running', 'retry_wait')",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if unfinished > 0 {
        tx.rollback().await?;
        return Ok(BackendDelete::Busy { unfinished });
    }
    // With `purge`, only finished jobs go (their attempt records with them: the
    // `attempts_follow_jobs` trigger). The state is checked again on each row deleted,
    // because a re-drive (which takes no lock on the backend) may have made a job
    // unfinished since the count above; such a job stays, and the delete is refused below.
    let mut jobs_removed = 0;
    if purge {
        jobs_removed = sqlx::query(
            "DELETE FROM jobs
             WHERE backend_id = $1 AND state IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs WHERE backend_id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    if left > 0 {
        tx.rollback().await?;
        return Ok(if purge {
            BackendDelete::Busy { unfinished: left }
        } else {
            BackendDelete::HasHistory { finished: left }
        });
    }
    sqlx::query("DELETE FROM backends WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(BackendDelete::Deleted { jobs_removed })
}
