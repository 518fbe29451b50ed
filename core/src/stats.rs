//! The operator's read side: queries behind `GET /v1/stats`, `GET /v1/jobs`,
//! `GET /v1/pin-index`, and the backend admin actions (`DELETE /v1/backends/{name}`,
//! `POST /v1/backends/{name}/check`) that the `pinq` CLI uses.
//!
//! Every query that shows jobs takes an owner filter: `None` lets an admin see every
//! tenant's jobs, `Some(owner)` keeps a tenant to its own.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool, Postgres, QueryBuilder};
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

/// Recent throughput and latency, measured on `finished_at`, in whole seconds: the
/// "last 10 s" are the 10 whole seconds before the current one, the "last 60 s" the 60
/// before it (the current second, still filling, is left out).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Recent {
    pub succeeded_10s: i64,
    pub failed_10s: i64,
    pub succeeded_60s: i64,
    pub failed_60s: i64,
    /// Submit→done latency (finished_at − created_at) over jobs finished in the last
    /// 60 s, in milliseconds; `None` when no job finished. The percentiles are estimated
    /// from latency buckets about 9 % wide (see [`percentile`]); the maximum is exact.
    pub latency_p50_ms: Option<f64>,
    pub latency_p90_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub latency_samples: i64,
}

/// Jobs per state, read from the tallies the `job_tallies` migration's triggers keep: a
/// few rows per owner, whatever the number of retained jobs.
pub async fn job_counts(pool: &PgPool, owner: Option<&str>) -> Result<JobCounts, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, sum(n)::int8 FROM job_tallies
         WHERE $1::text IS NULL OR owner = $1
         GROUP BY state",
    )
    .bind(owner)
    .fetch_all(pool)
    .await?;
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

/// Jobs in one latency bucket of [`percentile`]'s input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyBucket {
    /// Bucket b holds latencies from 2^(b/8) up to 2^((b+1)/8) milliseconds.
    pub bucket: i16,
    pub n: i64,
}

/// Buckets per doubling of the latency (`pinq_latency_bucket` in the migrations).
const BUCKETS_PER_DOUBLING: f64 = 8.0;

fn bucket_floor_ms(bucket: f64) -> f64 {
    (bucket / BUCKETS_PER_DOUBLING).exp2()
}

/// The `q` quantile (0 ≤ q ≤ 1) of latencies given as buckets sorted by bucket, the way
/// PostgreSQL's `percentile_cont` computes it from the sorted latencies (interpolating
/// between the two nearest to rank q × (n − 1)), with each latency taken to lie in its
/// bucket as if a bucket's n latencies were spread evenly over it, and capped at the
/// largest latency seen. `None` when there are none.
pub fn percentile(buckets: &[LatencyBucket], q: f64, max_ms: f64) -> Option<f64> {
    let total: i64 = buckets.iter().map(|b| b.n).sum();
    if total <= 0 {
        return None;
    }
    // The estimated k-th smallest latency (k from 0).
    let nth = |k: i64| -> f64 {
        let mut before = 0i64;
        for b in buckets.iter().filter(|b| b.n > 0) {
            if k < before + b.n {
                let within = ((k - before) as f64 + 0.5) / b.n as f64;
                return bucket_floor_ms(f64::from(b.bucket) + within);
            }
            before += b.n;
        }
        max_ms
    };
    let rank = q.clamp(0.0, 1.0) * (total - 1) as f64;
    let below = rank.floor();
    let (lo, hi) = (nth(below as i64), nth(rank.ceil() as i64));
    Some((lo + (rank - below) * (hi - lo)).min(max_ms))
}

/// Completions in the last 10 s and 60 s and the latency percentiles of the last 60 s,
/// from the per-second rows the `job_tallies` migration's triggers keep.
pub async fn recent(pool: &PgPool, owner: Option<&str>) -> Result<Recent, sqlx::Error> {
    let rows: Vec<(String, i16, bool, i64, f64)> = sqlx::query_as(
        "SELECT state, bucket,
                second >= date_trunc('second', now()) - interval '10 seconds' AS last_10s,
                sum(n)::int8, max(max_ms)
         FROM job_finishes
         WHERE second >= date_trunc('second', now()) - interval '60 seconds'
           AND second < date_trunc('second', now())
           AND ($1::text IS NULL OR owner = $1)
         GROUP BY 1, 2, 3",
    )
    .bind(owner)
    .fetch_all(pool)
    .await?;
    let mut r = Recent::default();
    let mut by_bucket: std::collections::BTreeMap<i16, i64> = Default::default();
    let mut max_ms: Option<f64> = None;
    for (state, bucket, last_10s, n, max) in rows {
        let succeeded = state == JobState::Succeeded.as_str();
        if succeeded {
            r.succeeded_60s += n;
        } else {
            r.failed_60s += n;
        }
        if last_10s {
            if succeeded {
                r.succeeded_10s += n;
            } else {
                r.failed_10s += n;
            }
        }
        *by_bucket.entry(bucket).or_default() += n;
        max_ms = Some(max_ms.map_or(max, |m: f64| m.max(max)));
    }
    let buckets: Vec<LatencyBucket> = by_bucket
        .into_iter()
        .map(|(bucket, n)| LatencyBucket { bucket, n })
        .collect();
    r.latency_samples = buckets.iter().map(|b| b.n).sum();
    if let Some(max) = max_ms {
        r.latency_p50_ms = percentile(&buckets, 0.5, max);
        r.latency_p90_ms = percentile(&buckets, 0.9, max);
        r.latency_p99_ms = percentile(&buckets, 0.99, max);
        r.latency_max_ms = Some(max);
    }
    Ok(r)
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
    // Each condition is written with its value, so the placeholders and the values bound
    // cannot fall out of step.
    let mut q = QueryBuilder::<Postgres>::new(format!(
        "SELECT {JOB_COLUMNS}
         FROM batches bt
         JOIN jobs j ON j.batch_id = bt.id
         JOIN backends b ON b.id = j.backend_id"
    ));
    let mut word = " WHERE ";
    let mut cond = |q: &mut QueryBuilder<Postgres>, sql: &str| {
        q.push(word).push(sql);
        word = " AND ";
    };
    if let Some(owner) = &f.owner {
        cond(&mut q, "bt.owner = ");
        q.push_bind(owner);
    }
    if let Some(state) = f.state {
        cond(&mut q, "j.state = ");
        q.push_bind(state.as_str());
    }
    if let Some(batch) = f.batch {
        cond(&mut q, "bt.id = ");
        q.push_bind(batch);
    }
    if !f.cids.is_empty() {
        cond(&mut q, "j.cid_key = ANY(");
        q.push_bind(&f.cids).push(")");
    }
    if let Some((at, id)) = f.after {
        // The first bound lets the batch index start at the cursor; the second is exact.
        cond(&mut q, "bt.created_at <= ");
        q.push_bind(at);
        cond(&mut q, "(bt.created_at, j.id) < (");
        q.push_bind(at).push(", ").push_bind(id).push(")");
    }
    q.push(" ORDER BY bt.created_at DESC, j.id DESC LIMIT ")
        .push_bind(f.limit);
    q.build_query_as().fetch_all(pool).await
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
    /// When the first owner's pin was done, and when the row last changed; both `None` in
    /// a tenant's view of a row another owner pinned first, as they would tell the tenant
    /// that someone else holds the content, and when they act on it.
    pub pinned_at: Option<DateTime<Utc>>,
    /// When the index update last found the pin on the backend (or a job pinned it). A
    /// listing that shows the pin does not write its row: the later of the row's own time
    /// and its backend's last complete listing (`backends.pins_listed_at`) is shown, unless
    /// that listing did not show the row (`pins.unlisted`) or the pin is `missing`.
    pub verified_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
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
/// the rows it holds a reference to, showing no other owner: the name, job and times of a
/// row another owner pinned first are left out.
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
                p.status,
                CASE WHEN $1::text IS NULL OR p.owner = $1 THEN p.pinned_at END AS pinned_at,
                CASE WHEN p.status <> 'missing' AND NOT p.unlisted
                     THEN greatest(p.verified_at, b.pins_listed_at)
                     ELSE p.verified_at END AS verified_at,
                CASE WHEN $1::text IS NULL OR p.owner = $1 THEN p.updated_at END AS updated_at
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
/// are deleted with it (no key cascades them: see the `pins_without_key` migration), and
/// its probes cascade.
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
    // The backend's row is locked (above), so no index update can add pins for it
    // meanwhile, and it has no job left whose success could.
    sqlx::query("DELETE FROM pins WHERE backend_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM backends WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(BackendDelete::Deleted { jobs_removed })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pinq_latency_bucket` of the migrations, for building test input.
    fn bucket_of(ms: f64) -> i16 {
        (BUCKETS_PER_DOUBLING * ms.log2()).floor() as i16
    }

    fn buckets(latencies: impl IntoIterator<Item = f64>) -> Vec<LatencyBucket> {
        let mut by: std::collections::BTreeMap<i16, i64> = Default::default();
        for ms in latencies {
            *by.entry(bucket_of(ms)).or_default() += 1;
        }
        by.into_iter()
            .map(|(bucket, n)| LatencyBucket { bucket, n })
            .collect()
    }

    #[test]
    fn percentiles_from_buckets_land_within_a_bucket_of_the_exact_ones() {
        // 1..=10,000 ms, and a skewed set: 9,900 fast jobs and 100 slow ones.
        let uniform: Vec<f64> = (1..=10_000).map(f64::from).collect();
        let skewed: Vec<f64> = (0..10_000)
            .map(|i| {
                if i < 9_900 {
                    2.0 + f64::from(i % 7)
                } else {
                    800.0 + f64::from(i)
                }
            })
            .collect();
        for set in [uniform, skewed] {
            let mut sorted = set.clone();
            sorted.sort_by(f64::total_cmp);
            let max = *sorted.last().unwrap();
            let b = buckets(set.iter().copied());
            for q in [0.5, 0.9, 0.99] {
                // PostgreSQL's `percentile_cont` on the latencies themselves.
                let rank = q * (sorted.len() - 1) as f64;
                let (lo, hi) = (sorted[rank.floor() as usize], sorted[rank.ceil() as usize]);
                let exact = lo + (rank - rank.floor()) * (hi - lo);
                let got = percentile(&b, q, max).unwrap();
                let ratio = got / exact;
                assert!(
                    (0.91..=1.1).contains(&ratio),
                    "q {q}: estimated {got} ms, exact {exact} ms"
                );
            }
        }
    }

    #[test]
    fn percentiles_of_few_samples_stay_within_what_was_seen() {
        assert_eq!(percentile(&[], 0.5, 0.0), None);
        // One job of 3 ms: every percentile is within its bucket and at most 3 ms.
        let one = buckets([3.0]);
        for q in [0.5, 0.99] {
            let got = percentile(&one, q, 3.0).unwrap();
            assert!((2.8..=3.0).contains(&got), "q {q}: {got}");
        }
        // Two far apart: between them, as `percentile_cont` puts it (500.5 and 990.01).
        let two = buckets([1.0, 1000.0]);
        let p50 = percentile(&two, 0.5, 1000.0).unwrap();
        assert!((455.0..=550.0).contains(&p50), "p50 {p50}");
        let p99 = percentile(&two, 0.99, 1000.0).unwrap();
        assert!((900.0..=1000.0).contains(&p99), "p99 {p99}");
    }
}
