//! Reading jobs back, against a real PostgreSQL: the job list's order, pages and filters
//! for a tenant and for an admin, and the per-tenant counts. The list finds jobs through
//! their batches, so these tests also hold the schema to what that relies on: every job
//! has its batch's owner and creation time, whichever path stored it.

use pinq_core::cid::canonical_of;
use pinq_core::db::{self, NewJob};
use pinq_core::model::{JobState, Op, Priority};
use pinq_core::psa::{self, JobSettings, NewPin};
use pinq_core::retry::RetryPolicy;
use pinq_core::stats::{self, JobFilter};
use pinq_e2e::{TestDb, new_job, random_cid, store_batch};
use serde_json::Map;
use sqlx::Connection;
use uuid::Uuid;

const V0: &str = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";

fn job(backend: Uuid, seq: i32, cid: &str) -> NewJob {
    new_job(backend, seq, Op::Pin, cid)
}

async fn store(db: &TestDb, owner: &str, jobs: Vec<NewJob>) -> anyhow::Result<Uuid> {
    Ok(store_batch(&db.pool, owner, jobs).await?.0)
}

/// Every page of the list for `filter`, followed by its cursor as the API does; returns
/// the ids in the order listed.
async fn all_pages(db: &TestDb, filter: &JobFilter) -> anyhow::Result<Vec<Uuid>> {
    let mut out = Vec::new();
    let mut f = filter.clone();
    for _ in 0..100 {
        let page = stats::list_jobs(&db.pool, &f).await?;
        assert!(
            page.len() as i64 <= f.limit,
            "a page holds at most its limit"
        );
        out.extend(page.iter().map(|j| j.id));
        if (page.len() as i64) < f.limit {
            return Ok(out);
        }
        let last = page.last().expect("a full page");
        f.after = Some((last.created_at, last.id));
    }
    anyhow::bail!("the list did not end within 100 pages")
}

/// The list's definition, straight from the jobs' own columns: newest first by creation
/// time, then id.
async fn expected(
    db: &TestDb,
    owner: Option<&str>,
    state: Option<&str>,
    batch: Option<Uuid>,
    cid_key: Option<&str>,
) -> anyhow::Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM jobs
         WHERE ($1::text IS NULL OR owner = $1) AND ($2::text IS NULL OR state = $2)
           AND ($3::uuid IS NULL OR batch_id = $3) AND ($4::text IS NULL OR cid_key = $4)
         ORDER BY created_at DESC, id DESC",
    )
    .bind(owner)
    .bind(state)
    .bind(batch)
    .bind(cid_key)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_list_pages_through_a_tenants_batches_newest_first() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let other = db::insert_backend(&db.pool, "c", "kubo", "http://127.0.0.1:9").await?;

    // Batches of both tenants, interleaved, of sizes that do not divide the page.
    let mut alice_batches = Vec::new();
    for (i, (owner, n)) in [
        ("alice", 3),
        ("bob", 2),
        ("alice", 5),
        ("bob", 1),
        ("alice", 1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut jobs: Vec<NewJob> = (0..n).map(|s| job(backend.id, s, &random_cid())).collect();
        if i == 2 {
            // One CID in its two spellings, on two backends, and one more job.
            jobs.push(job(backend.id, n, V0));
            jobs.push(job(other.id, n, &canonical_of(V0).expect("valid CID")));
            jobs.push(job(backend.id, n + 1, &random_cid()));
        }
        let id = store(&db, owner, jobs).await?;
        if owner == "alice" {
            alice_batches.push(id);
        }
    }
    // A request through the Pinning Service API stores its batch on its own path.
    let v0_canonical = canonical_of(V0).expect("valid CID");
    psa::add_request(
        &db.pool,
        &NewPin {
            owner: "alice".into(),
            cid: V0.into(),
            cid_canonical: v0_canonical.clone(),
            name: None,
            origins: vec![],
            meta: Map::new(),
        },
        std::slice::from_ref(&backend),
        JobSettings {
            priority: Priority::new(5)?,
            retry: RetryPolicy::default(),
        },
    )
    .await?;
    // Some jobs end, so the state filter has something to tell apart.
    sqlx::query(
        "UPDATE jobs SET state = 'failed', finished_at = now()
         WHERE id IN (SELECT id FROM jobs ORDER BY id LIMIT 4 OFFSET 2)",
    )
    .execute(&db.pool)
    .await?;

    // What the list relies on, for jobs of both paths.
    let (mismatched,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs j JOIN batches bt ON bt.id = j.batch_id
         WHERE j.owner <> bt.owner OR j.created_at <> bt.created_at",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        mismatched, 0,
        "every job has its batch's owner and creation time"
    );

    let base = JobFilter {
        limit: 2,
        ..JobFilter::default()
    };
    let cases: Vec<(JobFilter, Vec<Uuid>)> = vec![
        (
            JobFilter {
                owner: Some("alice".into()),
                ..base.clone()
            },
            expected(&db, Some("alice"), None, None, None).await?,
        ),
        (
            JobFilter {
                owner: Some("bob".into()),
                ..base.clone()
            },
            expected(&db, Some("bob"), None, None, None).await?,
        ),
        (base.clone(), expected(&db, None, None, None, None).await?),
        (
            JobFilter {
                owner: Some("alice".into()),
                state: Some(JobState::Failed),
                ..base.clone()
            },
            expected(&db, Some("alice"), Some("failed"), None, None).await?,
        ),
        (
            JobFilter {
                owner: Some("alice".into()),
                batch: Some(alice_batches[1]),
                ..base.clone()
            },
            expected(&db, Some("alice"), None, Some(alice_batches[1]), None).await?,
        ),
        (
            JobFilter {
                cids: vec![V0.to_owned(), v0_canonical.clone()],
                ..base.clone()
            },
            expected(&db, None, None, None, Some(&v0_canonical)).await?,
        ),
    ];
    for (filter, want) in &cases {
        let got = all_pages(&db, filter).await?;
        assert_eq!(&got, want, "the list for {filter:?}");
    }
    // The cases are not trivially empty: each tenant, both states and every spelling.
    let lens: Vec<usize> = cases.iter().map(|(_, w)| w.len()).collect();
    assert_eq!(lens, vec![13, 3, 16, 2, 8, 3], "cases");

    // One tenant never sees another's jobs, even by asking for its batch.
    let bobs_view = all_pages(
        &db,
        &JobFilter {
            owner: Some("bob".into()),
            batch: Some(alice_batches[0]),
            ..base.clone()
        },
    )
    .await?;
    assert!(bobs_view.is_empty(), "bob lists none of alice's batch");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_and_recent_figures_are_per_tenant() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    store(
        &db,
        "alice",
        (0..4).map(|s| job(backend.id, s, &random_cid())).collect(),
    )
    .await?;
    store(
        &db,
        "bob",
        (0..3).map(|s| job(backend.id, s, &random_cid())).collect(),
    )
    .await?;
    // Everything was created a second ago, so a latency has a known floor; then alice's
    // first two jobs succeed and her third fails, and bob's first succeeds.
    sqlx::query("UPDATE batches SET created_at = created_at - interval '1 second'")
        .execute(&db.pool)
        .await?;
    sqlx::query("UPDATE jobs SET created_at = created_at - interval '1 second'")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "UPDATE jobs SET finished_at = now(),
                         state = CASE WHEN seq < 2 THEN 'succeeded' ELSE 'failed' END
         WHERE (owner = 'alice' AND seq < 3) OR (owner = 'bob' AND seq = 0)",
    )
    .execute(&db.pool)
    .await?;

    let alice = stats::job_counts(&db.pool, Some("alice")).await?;
    assert_eq!(
        (alice.queued, alice.succeeded, alice.failed),
        (1, 2, 1),
        "alice: {alice:?}"
    );
    let bob = stats::job_counts(&db.pool, Some("bob")).await?;
    assert_eq!(
        (bob.queued, bob.succeeded, bob.failed),
        (2, 1, 0),
        "bob: {bob:?}"
    );
    let all = stats::job_counts(&db.pool, None).await?;
    assert_eq!(
        (all.queued, all.succeeded, all.failed),
        (3, 3, 1),
        "all: {all:?}"
    );
    let nobody = stats::job_counts(&db.pool, Some("carol")).await?;
    assert_eq!(nobody, stats::JobCounts::default());

    // The recent figures count whole seconds: wait for the current one to end.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let alice = stats::recent(&db.pool, Some("alice")).await?;
    assert_eq!(
        (alice.succeeded_60s, alice.failed_60s, alice.latency_samples),
        (2, 1, 3),
        "alice: {alice:?}"
    );
    // Every latency is at least a second; the estimate can be as low as the floor of the
    // bucket holding 1,000 ms (buckets are 2^(1/8) wide), and the maximum is exact.
    assert!(
        alice
            .latency_p50_ms
            .is_some_and(|ms| ms >= 1000.0 / 2f64.powf(1.0 / 8.0)),
        "alice's latency counts from creation: {alice:?}"
    );
    assert!(
        alice.latency_max_ms.is_some_and(|ms| ms >= 1000.0),
        "{alice:?}"
    );
    let bob = stats::recent(&db.pool, Some("bob")).await?;
    assert_eq!((bob.succeeded_60s, bob.failed_60s), (1, 0), "bob: {bob:?}");
    let all = stats::recent(&db.pool, None).await?;
    assert_eq!((all.succeeded_60s, all.failed_60s), (3, 1), "all: {all:?}");
    Ok(())
}

/// The counts of `GET /v1/stats` come from tallies that triggers keep per statement and
/// per database session (`job_tallies`): they follow inserts, every state change, deletes
/// and a truncate; the scheduler's fold moves an ended session's rows into one row per
/// owner and state, so the table stays small however many jobs there are; and the
/// per-second finishes behind the recent figures age out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallies_follow_every_change_and_fold_when_sessions_end() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    for owner in ["alice", "bob"] {
        for _ in 0..5 {
            let jobs = (0..1000)
                .map(|s| job(backend.id, s, &random_cid()))
                .collect();
            store(&db, owner, jobs).await?;
        }
    }
    db.check_tallies().await?;
    let counts = stats::job_counts(&db.pool, Some("alice")).await?;
    assert_eq!(counts.queued, 5000, "{counts:?}");

    // A session of its own changes jobs in each way, then ends.
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    let steps = [
        // Claimed, then most succeed, a few fail and one waits to retry.
        "UPDATE jobs SET state = 'running', lease_owner = gen_random_uuid(), started_at = now()
         WHERE seq < 100",
        "UPDATE jobs SET state = 'succeeded', lease_owner = NULL, finished_at = now()
         WHERE seq < 90",
        "UPDATE jobs SET state = 'failed', lease_owner = NULL, finished_at = now()
         WHERE seq BETWEEN 90 AND 97",
        "UPDATE jobs SET state = 'retry_wait', lease_owner = NULL, retry_at = now()
         WHERE seq > 97 AND state = 'running'",
        // Cancelled while queued; an update that changes no state; retention's delete.
        "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE seq >= 900",
        "UPDATE jobs SET cancel_requested = true WHERE seq BETWEEN 500 AND 509",
        "DELETE FROM jobs WHERE state = 'cancelled' AND owner = 'bob'",
    ];
    for sql in steps {
        sqlx::query(sql).execute(&mut conn).await?;
        db.check_tallies()
            .await
            .map_err(|e| e.context(format!("after {sql}")))?;
    }
    let alice = stats::job_counts(&db.pool, Some("alice")).await?;
    assert_eq!(
        (
            alice.succeeded,
            alice.failed,
            alice.retry_wait,
            alice.cancelled
        ),
        (450, 40, 10, 500),
        "{alice:?}"
    );
    assert_eq!(alice.queued, 5000 - 450 - 40 - 10 - 500, "{alice:?}");
    let bob = stats::job_counts(&db.pool, Some("bob")).await?;
    assert_eq!((bob.succeeded, bob.cancelled), (450, 0), "{bob:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let recent = stats::recent(&db.pool, None).await?;
    assert_eq!(
        (
            recent.succeeded_10s,
            recent.failed_60s,
            recent.latency_samples
        ),
        (900, 80, 980),
        "{recent:?}"
    );

    let rows_of = |shard: i32| {
        let pool = db.pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM job_tallies WHERE shard = $1")
                .bind(shard)
                .fetch_one(&pool)
                .await?;
            anyhow::Ok(n)
        }
    };
    assert!(rows_of(pid).await? > 0, "the session wrote rows of its own");
    // A live session's rows stay where they are.
    db::fold_job_tallies(&db.pool).await?;
    assert!(rows_of(pid).await? > 0);
    conn.close().await?;
    // The server may take a moment to let the session go.
    let mut folded = 0;
    for _ in 0..50 {
        folded += db::fold_job_tallies(&db.pool).await?;
        if rows_of(pid).await? == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(folded > 0, "the ended session's rows were folded");
    assert_eq!(rows_of(pid).await?, 0);
    db.check_tallies().await?;
    // At most a row per owner and state in shard 0 and in each of the pool's (at most 4)
    // sessions.
    let rows = db.count("job_tallies").await;
    assert!(rows <= 2 * 6 * 5, "{rows} rows for 10,000 jobs");
    assert_eq!(
        stats::job_counts(&db.pool, Some("alice")).await?,
        alice,
        "folding changes no count"
    );

    // Finishes older than two minutes go; the recent ones stay.
    sqlx::query(
        "INSERT INTO job_finishes (second, owner, state, bucket, shard, n, max_ms)
         VALUES (date_trunc('second', now()) - interval '3 minutes', 'alice', 'succeeded',
                 10, 0, 7, 2.0)",
    )
    .execute(&db.pool)
    .await?;
    db::fold_job_tallies(&db.pool).await?;
    let (old,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM job_finishes WHERE second < now() - interval '2 minutes'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(old, 0, "old finishes were deleted");
    assert_eq!(stats::recent(&db.pool, None).await?.latency_samples, 980);

    sqlx::query("TRUNCATE jobs CASCADE")
        .execute(&db.pool)
        .await?;
    assert_eq!(
        stats::job_counts(&db.pool, None).await?,
        stats::JobCounts::default()
    );
    assert_eq!(
        stats::recent(&db.pool, None).await?,
        stats::Recent::default()
    );
    Ok(())
}

/// The recent figures' percentiles, estimated from latency buckets, land within a bucket
/// (about 9 %) of PostgreSQL's own `percentile_cont` over the jobs, the maximum exactly;
/// a recount gives back tallies that were made wrong; and the check of the tallies sees
/// finishes that were not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_percentiles_follow_the_jobs_and_a_recount_mends_the_tallies() -> anyhow::Result<()>
{
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let jobs = (0..2000)
        .map(|s| job(backend.id, s, &random_cid()))
        .collect();
    store(&db, "alice", jobs).await?;
    // Latencies from 3 ms to about 20 s, skewed: most jobs fast, a tail of slow ones.
    sqlx::query(
        "UPDATE jobs SET created_at = now() - make_interval(secs => 0.003 * power(1.0045, seq))",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query("UPDATE jobs SET state = 'succeeded', finished_at = now()")
        .execute(&db.pool)
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let got = stats::recent(&db.pool, None).await?;
    let (exact,): (Vec<f64>,) = sqlx::query_as(
        "SELECT ARRAY[percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                      percentile_cont(0.9) WITHIN GROUP (ORDER BY ms),
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                      max(ms)]
         FROM (SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 AS ms
               FROM jobs) l",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(got.latency_samples, 2000, "{got:?}");
    let estimated = [got.latency_p50_ms, got.latency_p90_ms, got.latency_p99_ms];
    for (q, (est, exact)) in ["p50", "p90", "p99"]
        .iter()
        .zip(estimated.iter().zip(&exact))
    {
        let est = est.unwrap_or(f64::NAN);
        assert!(
            (est / exact - 1.0).abs() <= 0.1,
            "{q}: estimated {est} ms, percentile_cont {exact} ms"
        );
    }
    let max = got.latency_max_ms.unwrap_or(f64::NAN);
    assert!(
        (max - exact[3]).abs() < 1e-6,
        "max {max} against {}",
        exact[3]
    );

    // A tally made wrong (as a data-only restore would leave it) is counted again.
    sqlx::query("UPDATE job_tallies SET n = n + 5")
        .execute(&db.pool)
        .await?;
    assert!(
        db.check_tallies().await.is_err(),
        "the check sees the drift"
    );
    let (total,): (i64,) = sqlx::query_as("SELECT pinq_recount_job_tallies()")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(total, 2000);
    db.check_tallies().await?;

    // A finish the triggers did not keep is seen too: the slowest jobs' bucket goes.
    sqlx::query("DELETE FROM job_finishes WHERE bucket = (SELECT max(bucket) FROM job_finishes)")
        .execute(&db.pool)
        .await?;
    let missed = db.check_tallies().await;
    assert!(
        missed
            .as_ref()
            .is_err_and(|e| e.to_string().contains("recent finishes miss")),
        "the check sees the missing finishes: {missed:?}"
    );
    Ok(())
}

/// The tallies migration counts the jobs already there, and its triggers take over from
/// that count: a database with jobs in several states before the migration agrees with
/// its tallies after it, and after more changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tallies_migration_counts_the_jobs_already_there() -> anyhow::Result<()> {
    let db = TestDb::create_migrated_to(20261127000010).await?;
    let backend = db.insert_backend_row("b").await?;
    for owner in ["alice", "bob"] {
        let jobs = (0..30).map(|s| job(backend, s, &random_cid())).collect();
        store(&db, owner, jobs).await?;
    }
    sqlx::query(
        "UPDATE jobs SET state = CASE WHEN seq < 10 THEN 'succeeded' ELSE 'failed' END,
                         finished_at = now()
         WHERE seq < 15",
    )
    .execute(&db.pool)
    .await?;
    db::MIGRATOR.run(&db.pool).await?;
    db.check_tallies().await?;
    let bob = stats::job_counts(&db.pool, Some("bob")).await?;
    assert_eq!(
        (bob.queued, bob.succeeded, bob.failed),
        (15, 10, 5),
        "{bob:?}"
    );
    // The finishes of the last two minutes were counted too.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let recent = stats::recent(&db.pool, None).await?;
    assert_eq!(
        (recent.succeeded_60s, recent.failed_60s),
        (20, 10),
        "{recent:?}"
    );
    sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE seq >= 25")
        .execute(&db.pool)
        .await?;
    db.check_tallies().await?;
    Ok(())
}
