//! `prune`: retention. Deletes finished jobs (and their attempt records, in the same
//! statement), batches left without jobs, finished schedule runs and probe history,
//! each older than its configured age, in bounded chunks so no statement holds many locks
//! or runs long.

use serde_json::{Value, json};

use super::{TaskCtx, arg_i64};

pub async fn run(ctx: &TaskCtx, args: &Value) -> anyhow::Result<Value> {
    let s = &ctx.settings;
    let chunk = arg_i64(args, "chunk_size", 5000, 100, 50_000);
    let jobs_days = arg_i64(args, "jobs_days", i64::from(s.retain_jobs_days), 0, 36_500);
    let runs_days = arg_i64(args, "runs_days", i64::from(s.retain_runs_days), 0, 36_500);
    let probes_days = arg_i64(
        args,
        "probes_days",
        i64::from(s.retain_probes_days),
        0,
        36_500,
    );

    // Only jobs whose whole batch is finished, so a batch never shows half its jobs.
    let jobs = chunked(ctx, chunk, jobs_days, |limit, days| {
        sqlx::query(
            // The outer tests are checked again on the row being deleted, so a job
            // re-driven while this runs is not deleted (every writer of a job, and so
            // every writer of an attempt record, sets its `updated_at`).
            // Old jobs are found through their batches (`batches_created`): no index of
            // `jobs` names a column a job's progress changes (see the `hot_jobs` migration).
            // Their attempt records go with them (the `attempts_follow_jobs` trigger).
            "DELETE FROM jobs WHERE id IN (
                 SELECT j.id FROM batches b JOIN jobs j ON j.batch_id = b.id
                 WHERE b.created_at < now() - make_interval(days => $2::int)
                   AND j.state IN ('succeeded', 'failed', 'cancelled')
                   AND j.updated_at < now() - make_interval(days => $2::int)
                   AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.batch_id = j.batch_id
                                   AND o.state IN ('queued', 'running', 'retry_wait'))
                 LIMIT $1)
             AND state IN ('succeeded', 'failed', 'cancelled')
             AND updated_at < now() - make_interval(days => $2::int)",
        )
        .bind(limit)
        .bind(days)
    })
    .await?;
    let batches = chunked(ctx, chunk, jobs_days, |limit, days| {
        sqlx::query(
            "DELETE FROM batches WHERE id IN (
                 SELECT b.id FROM batches b
                 WHERE b.created_at < now() - make_interval(days => $2::int)
                   AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id)
                 LIMIT $1)",
        )
        .bind(limit)
        .bind(days)
    })
    .await?;
    let runs = chunked(ctx, chunk, runs_days, |limit, days| {
        sqlx::query(
            "DELETE FROM schedule_runs WHERE id IN (
                 SELECT id FROM schedule_runs
                 WHERE created_at < now() - make_interval(days => $2::int)
                   AND status IN ('succeeded', 'failed', 'skipped')
                 LIMIT $1)",
        )
        .bind(limit)
        .bind(days)
    })
    .await?;
    let probes = chunked(ctx, chunk, probes_days, |limit, days| {
        sqlx::query(
            "DELETE FROM backend_probes WHERE id IN (
                 SELECT id FROM backend_probes
                 WHERE probed_at < now() - make_interval(days => $2::int)
                 LIMIT $1)",
        )
        .bind(limit)
        .bind(days)
    })
    .await?;
    Ok(json!({
        "jobs_deleted": jobs,
        "batches_deleted": batches,
        "runs_deleted": runs,
        "probes_deleted": probes,
        "retention_days": {"jobs": jobs_days, "runs": runs_days, "probes": probes_days},
    }))
}

/// Runs a bounded delete until it deletes less than a full chunk.
async fn chunked<'q, F>(ctx: &TaskCtx, chunk: i64, days: i64, make: F) -> anyhow::Result<u64>
where
    F: Fn(i64, i32) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
{
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    let mut total = 0u64;
    loop {
        let n = make(chunk, days).execute(&ctx.pool).await?.rows_affected();
        total += n;
        if n < chunk as u64 {
            return Ok(total);
        }
        if ctx.shutdown.is_cancelled() {
            anyhow::bail!("interrupted by shutdown after deleting {total} rows");
        }
    }
}
