//! Claims, leases, retry timers and the dispatch outbox's safety net against a real
//! PostgreSQL, at the level of the statements the worker and the relay run: a claim's
//! jobs are updated in place (HOT), a claim's lease is one row the worker extends and the
//! relay takes back, and published outbox entries stay until checked.

use std::time::Duration;

use chrono::Utc;
use pinq_core::db::{self, ClaimedJob, LeaseStatus, NewJob, Outcome, RelayScan};
use pinq_core::model::Op;
use pinq_e2e::{TestDb, new_job, relay_scan, store_batch};
use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

fn pin_job(backend: Uuid, seq: i32) -> NewJob {
    // Distinct, well-formed CIDs are not needed here: the index is keyed by whatever the
    // job names.
    new_job(backend, seq, Op::Pin, &format!("bafy-lease-test-{seq}"))
}

/// Stores `n` pin jobs as one batch whose messages count as published; returns their ids.
async fn store(pool: &sqlx::PgPool, backend: Uuid, n: i32) -> anyhow::Result<Vec<Uuid>> {
    let jobs = (0..n).map(|i| pin_job(backend, i)).collect();
    Ok(store_batch(pool, "alice", jobs).await?.1)
}

async fn state_of(pool: &sqlx::PgPool, id: Uuid) -> anyhow::Result<String> {
    let (state,): (String,) = sqlx::query_as("SELECT state FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?;
    Ok(state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_index_of_jobs_names_a_column_that_claims_or_successes_change() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    // Every column the claim and the success statements assign a new value.
    let hot_path = [
        "state",
        "attempt",
        "lease_owner",
        "claim_id",
        "started_at",
        "updated_at",
        "finished_at",
        "last_error",
        "succeeded_by",
    ];
    // The columns each index of `jobs` names, in its key, its expressions or its predicate.
    let named: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, a.attname::text
         FROM pg_index i
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE i.indrelid = 'jobs'::regclass
           AND (a.attnum = ANY(i.indkey)
                OR pg_get_expr(i.indpred, i.indrelid) ~ ('\\m' || a.attname || '\\M')
                OR pg_get_expr(i.indexprs, i.indrelid) ~ ('\\m' || a.attname || '\\M'))",
    )
    .fetch_all(&db.pool)
    .await?;
    assert!(
        named.iter().any(|(_, col)| col == "id"),
        "the query sees the primary key: {named:?}"
    );
    let offending: Vec<&(String, String)> = named
        .iter()
        .filter(|(_, col)| hot_path.contains(&col.as_str()))
        .collect();
    assert!(
        offending.is_empty(),
        "indexes of jobs name columns the hot path changes, so its updates cannot be HOT: {offending:?}"
    );

    // And PostgreSQL does update the rows in place, by the room each page keeps alone:
    // another session holds a snapshot from before the first claim, so no old version
    // can be pruned to make room. (Pruning is opportunistic: it waits for every snapshot
    // that could still see the old version, and skips a page another backend has pinned,
    // so a count that leaned on it varied from run to run.) The rows sweep the widths
    // that decide how many fit on a page: the shortest CID-like text, with names of 0 to
    // 400 bytes. The updates run on one connection, so its statistics can be flushed
    // before they are read.
    let mut holder = sqlx::PgConnection::connect(&db.url).await?;
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await?;
    let backend = db::insert_backend(&one, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::new_v4();
    let jobs: Vec<NewJob> = (0..=40)
        .flat_map(|width| (0..24).map(move |i| (width * 24 + i, width * 10)))
        .map(|(seq, name_len)| NewJob {
            name: (name_len > 0).then(|| "n".repeat(name_len as usize)),
            ..pin_job(backend.id, seq)
        })
        .collect();
    let n = jobs.len() as i64;
    let ids = store_batch(&one, "alice", jobs).await?.1;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut holder)
        .await?;
    let (seen,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&mut holder)
        .await?;
    assert_eq!(seen, n, "the held snapshot sees the stored jobs");
    for chunk in ids.chunks(32) {
        let claimed = db::claim_jobs(&one, chunk, worker, Duration::from_secs(30)).await?;
        assert_eq!(claimed.len(), chunk.len());
        let group: Vec<&ClaimedJob> = claimed.iter().collect();
        let written = db::finish_succeeded(&one, &group, worker).await?;
        assert_eq!(written.len(), chunk.len());
    }
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&one)
        .await?;
    let (updates, hot): (i64, i64) = sqlx::query_as(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
    )
    .fetch_one(&one)
    .await?;
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    assert_eq!(updates, 2 * n, "one claim and one success per job");
    // With no pruning, an update is HOT only if its page still has room for the new
    // version. Each page keeps room for both updates of every row it was filled with (the
    // `jobs_room_for_two_updates` migration). Without that room the count falls short:
    // at fill factor 33 some widths left a page's last success without room; at 50 most
    // successes found none.
    assert_eq!(
        hot, updates,
        "only {hot} of {updates} updates of jobs were HOT"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_claim_gives_back_only_its_running_jobs_and_leaves() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::new_v4();
    let ids = store(&db.pool, backend.id, 3).await?;
    let claimed = db::claim_jobs(&db.pool, &ids, worker, Duration::from_secs(2)).await?;
    assert_eq!(claimed.len(), 3);
    let claim = claimed[0].claim_id;
    assert!(
        claimed.iter().all(|j| j.claim_id == claim),
        "one claim row covers one claim's jobs"
    );
    let finished: Vec<&ClaimedJob> = claimed.iter().filter(|j| j.id != ids[2]).collect();
    db::finish_succeeded(&db.pool, &finished, worker).await?;

    // While the lease holds, the relay leaves the claim alone.
    let (taken, requeued) = relay_scan(&db.pool, RelayScan::ExpiredLeases).await?;
    assert_eq!((taken, requeued.len()), (0, 0));

    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let (taken, requeued) = relay_scan(&db.pool, RelayScan::ExpiredLeases).await?;
    assert_eq!(taken, 1, "the expired claim was taken");
    assert_eq!(
        requeued,
        vec![ids[2]],
        "only the job still running went back"
    );
    assert_eq!(state_of(&db.pool, ids[0]).await?, "succeeded");
    assert_eq!(state_of(&db.pool, ids[1]).await?, "succeeded");
    assert_eq!(state_of(&db.pool, ids[2]).await?, "queued");
    let (claims,): (i64,) = sqlx::query_as("SELECT count(*) FROM job_claims")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(claims, 0, "the claim left with its lease");
    let (outcome,): (String,) =
        sqlx::query_as("SELECT outcome FROM job_attempts WHERE job_id = $1 AND attempt = 1")
            .bind(ids[2])
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(outcome, "lost");

    // The worker's next extension finds the claim gone and stops the job; its late
    // outcome is fenced off.
    let status = db::extend_leases(
        &db.pool,
        claim,
        &[(ids[2], 1)],
        worker,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(status, vec![(ids[2], LeaseStatus::Lost)]);
    let late = db::finish_job(&db.pool, &claimed[2], worker, &Outcome::Succeeded).await?;
    assert!(!late, "an outcome under a lost claim is not written");
    assert_eq!(state_of(&db.pool, ids[2]).await?, "queued");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_claim_keeps_its_jobs_and_reports_cancel_requests() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::new_v4();
    let ids = store(&db.pool, backend.id, 2).await?;
    let claimed = db::claim_jobs(&db.pool, &ids, worker, Duration::from_secs(1)).await?;
    let claim = claimed[0].claim_id;
    db::cancel_job(&db.pool, ids[1], None).await?;
    let running: Vec<(Uuid, i32)> = claimed.iter().map(|j| (j.id, j.attempt)).collect();
    // Another worker's extension of this claim is no extension at all.
    let stranger = db::extend_leases(
        &db.pool,
        claim,
        &running,
        Uuid::new_v4(),
        Duration::from_secs(30),
    )
    .await?;
    assert!(stranger.iter().all(|(_, s)| *s == LeaseStatus::Lost));

    let mut status =
        db::extend_leases(&db.pool, claim, &running, worker, Duration::from_secs(30)).await?;
    status.sort_by_key(|(id, _)| *id);
    assert_eq!(
        status,
        vec![
            (ids[0], LeaseStatus::Held),
            (ids[1], LeaseStatus::CancelRequested)
        ]
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (taken, requeued) = relay_scan(&db.pool, RelayScan::ExpiredLeases).await?;
    assert_eq!(
        (taken, requeued.len()),
        (0, 0),
        "the extended lease outlived the first one"
    );
    assert_eq!(state_of(&db.pool, ids[0]).await?, "running");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_for_its_time_and_a_cancel_clears_it() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::new_v4();
    let ids = store(&db.pool, backend.id, 3).await?;
    let claimed = db::claim_jobs(&db.pool, &ids, worker, Duration::from_secs(30)).await?;
    let later = Utc::now() + chrono::Duration::seconds(3600);
    let due = Utc::now() - chrono::Duration::seconds(1);
    for (job, run_at) in claimed.iter().zip([due, later, due]) {
        let outcome = Outcome::Retry {
            error: "node said no".into(),
            run_at,
        };
        assert!(db::finish_job(&db.pool, job, worker, &outcome).await?);
    }
    db::cancel_job(&db.pool, ids[2], None).await?;
    let timers: Vec<(Uuid, Option<chrono::DateTime<Utc>>)> =
        sqlx::query_as("SELECT id, retry_at FROM jobs WHERE id = ANY($1) ORDER BY id")
            .bind(&ids)
            .fetch_all(&db.pool)
            .await?;
    assert!(timers[0].1.is_some() && timers[1].1.is_some());
    assert_eq!(timers[2].1, None, "a cancelled retry has no timer left");

    let (_, requeued) = relay_scan(&db.pool, RelayScan::DueRetries).await?;
    assert_eq!(requeued, vec![ids[0]], "only the due retry went back");
    assert_eq!(state_of(&db.pool, ids[0]).await?, "queued");
    assert_eq!(state_of(&db.pool, ids[1]).await?, "retry_wait");
    assert_eq!(state_of(&db.pool, ids[2]).await?, "cancelled");
    let (timer,): (Option<chrono::DateTime<Utc>>,) =
        sqlx::query_as("SELECT retry_at FROM jobs WHERE id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(timer, None, "a requeued retry has no timer left");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_entries_are_checked_then_leave_or_are_owed_again() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::new_v4();
    let started = store(&db.pool, backend.id, 2).await?;
    let waiting = store(&db.pool, backend.id, 3).await?;
    let claimed = db::claim_jobs(&db.pool, &started, worker, Duration::from_secs(30)).await?;
    let group: Vec<&ClaimedJob> = claimed.iter().collect();
    db::finish_succeeded(&db.pool, &group, worker).await?;
    // One of the waiting jobs starts too; another is cancelled.
    db::claim_jobs(&db.pool, &waiting[..1], worker, Duration::from_secs(30)).await?;
    db::cancel_job(&db.pool, waiting[1], None).await?;

    // Not yet old enough: nothing is checked, nothing is owed.
    let mut tx = db.pool.begin().await?;
    let (checked, owed) = db::relay_reowe_stale(&mut tx, Duration::from_secs(3600), 100).await?;
    tx.commit().await?;
    assert_eq!((checked, owed), (0, 0));
    let mut tx = db.pool.begin().await?;
    let none = db::relay_take_owed(&mut tx, Duration::ZERO, 100).await?;
    tx.rollback().await?;
    assert!(none.0.is_empty(), "published entries are not owed");

    let mut tx = db.pool.begin().await?;
    let (checked, owed) = db::relay_reowe_stale(&mut tx, Duration::ZERO, 100).await?;
    tx.commit().await?;
    assert_eq!((checked, owed), (2, 1));
    let entries: Vec<(Vec<Uuid>, bool)> =
        sqlx::query_as("SELECT job_ids, published_at IS NULL FROM dispatch_outbox")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        entries,
        vec![(vec![waiting[2]], true)],
        "the entry whose jobs all started left; the other is owed again for its queued job"
    );
    let mut tx = db.pool.begin().await?;
    let (taken, jobs) = db::relay_take_owed(&mut tx, Duration::ZERO, 100).await?;
    tx.rollback().await?;
    assert_eq!(taken.len(), 1);
    assert_eq!(
        jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![waiting[2]]
    );
    Ok(())
}
