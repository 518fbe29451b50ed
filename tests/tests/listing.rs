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

    let alice = stats::recent(&db.pool, Some("alice")).await?;
    assert_eq!(
        (alice.succeeded_60s, alice.failed_60s, alice.latency_samples),
        (2, 1, 3),
        "alice: {alice:?}"
    );
    assert!(
        alice.latency_p50_ms.is_some_and(|ms| ms >= 1000.0),
        "alice's latency counts from creation: {alice:?}"
    );
    let bob = stats::recent(&db.pool, Some("bob")).await?;
    assert_eq!((bob.succeeded_60s, bob.failed_60s), (1, 0), "bob: {bob:?}");
    let all = stats::recent(&db.pool, None).await?;
    assert_eq!((all.succeeded_60s, all.failed_60s), (3, 1), "all: {all:?}");
    Ok(())
}
