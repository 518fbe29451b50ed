//! The worker's grouped writers against a real PostgreSQL: a batch stored in one
//! statement with its dispatch-outbox row, claims, and successes written in one
//! statement with their attempt records and pin-index changes, fenced by the lease.

use std::time::Duration;

use pinq_core::cid::canonical_of;
use pinq_core::db::{self, ClaimedJob, NewBatch, NewJob, Stored};
use pinq_core::model::{Op, Priority};
use pinq_core::retry::RetryPolicy;
use pinq_e2e::TestDb;
use serde_json::json;
use uuid::Uuid;

const A: &str = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
const B: &str = "bafkreidvbhs33ighmljlvr7zbv2ywwzcmp5adtf4kqvlly67cy56bdtmve";
const C: &str = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";

fn job(backend: Uuid, seq: i32, op: Op, cid: &str) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        seq,
        backend_id: backend,
        op,
        cid: cid.to_owned(),
        replaces_cid: None,
        name: Some(format!("job-{seq}")),
        meta: json!({}),
    }
}

async fn store(db: &TestDb, owner: &str, jobs: Vec<NewJob>) -> anyhow::Result<(Uuid, Vec<Uuid>)> {
    let batch = NewBatch {
        id: Uuid::now_v7(),
        owner: owner.to_owned(),
        priority: Priority::new(5)?,
        backends: vec!["b".into()],
        retry: RetryPolicy::default(),
        idempotency_key: None,
        jobs,
    };
    match db::insert_batch(&db.pool, &batch).await? {
        Stored::Created { id, owed } => {
            db::settle_dispatch(&db.pool, owed.entry).await?;
            Ok((id, owed.jobs.into_iter().map(|(id, _)| id).collect()))
        }
        Stored::Existing { .. } => anyhow::bail!("a fresh batch was taken for an existing one"),
    }
}

async fn claim(db: &TestDb, ids: &[Uuid], worker: Uuid) -> anyhow::Result<Vec<ClaimedJob>> {
    let mut claimed = db::claim_jobs(&db.pool, ids, worker, Duration::from_secs(30)).await?;
    // In the order asked for, as a worker's completer would hold them.
    claimed.sort_by_key(|j| ids.iter().position(|id| *id == j.id));
    Ok(claimed)
}

/// Stores the jobs as one batch, claims them all and writes their successes as one group;
/// returns their ids and the ids written.
async fn run_as_one_group(
    db: &TestDb,
    worker: Uuid,
    jobs: Vec<NewJob>,
) -> anyhow::Result<(Vec<Uuid>, Vec<Uuid>)> {
    let (_, ids) = store(db, "alice", jobs).await?;
    let claimed = claim(db, &ids, worker).await?;
    let group: Vec<&ClaimedJob> = claimed.iter().collect();
    let written = db::finish_succeeded(&db.pool, &group, worker).await?;
    Ok((ids, written))
}

async fn pin_row(db: &TestDb, backend: Uuid, cid: &str) -> anyhow::Result<Option<(String, Uuid)>> {
    let key = canonical_of(cid).expect("valid CID");
    Ok(
        sqlx::query_as("SELECT owner, job_id FROM pins WHERE backend_id = $1 AND cid = $2")
            .bind(backend)
            .bind(key)
            .fetch_optional(&db.pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_statement_and_its_outbox_row_names_every_job() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let batch = NewBatch {
        id: Uuid::now_v7(),
        owner: "alice".into(),
        priority: Priority::new(5)?,
        backends: vec!["b".into()],
        retry: RetryPolicy::default(),
        idempotency_key: Some("k1".into()),
        jobs: vec![
            job(backend.id, 0, Op::Pin, A),
            job(backend.id, 1, Op::Pin, B),
        ],
    };
    let Stored::Created { id, owed } = db::insert_batch(&db.pool, &batch).await? else {
        anyhow::bail!("the first submit must create the batch");
    };
    assert_eq!(id, batch.id);
    let (named,): (Vec<Uuid>,) =
        sqlx::query_as("SELECT job_ids FROM dispatch_outbox WHERE id = $1 AND self_publishing")
            .bind(owed.entry)
            .fetch_one(&db.pool)
            .await?;
    let stored: Vec<(Uuid,)> =
        sqlx::query_as("SELECT id FROM jobs WHERE batch_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(named, stored.iter().map(|r| r.0).collect::<Vec<_>>());

    // The same key again writes nothing and names the first batch.
    let again = NewBatch {
        id: Uuid::now_v7(),
        ..batch.clone()
    };
    assert_eq!(
        db::insert_batch(&db.pool, &again).await?,
        Stored::Existing { id, job_count: 2 }
    );
    assert_eq!(db.count("jobs").await, 2);
    assert_eq!(db.count("dispatch_outbox").await, 1);

    // A backend deleted under the batch: nothing is stored, and the error is the
    // foreign key's.
    let gone = NewBatch {
        id: Uuid::now_v7(),
        idempotency_key: None,
        jobs: vec![job(Uuid::now_v7(), 0, Op::Pin, C)],
        ..batch
    };
    let err = db::insert_batch(&db.pool, &gone)
        .await
        .expect_err("a missing backend is refused");
    assert_eq!(pinq_e2e::sqlstate(&err).as_deref(), Some("23503"), "{err}");
    assert_eq!(db.count("batches").await, 1);
    assert_eq!(db.count("jobs").await, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_successes_writes_only_what_its_lease_still_covers() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let (_, earlier) = store(&db, "alice", vec![job(backend.id, 0, Op::Pin, C)]).await?;
    let worker = Uuid::now_v7();
    let first = claim(&db, &earlier, worker).await?;
    assert_eq!(
        db::finish_succeeded(&db.pool, &first.iter().collect::<Vec<_>>(), worker).await?,
        earlier
    );
    assert!(pin_row(&db, backend.id, C).await?.is_some(), "C is pinned");

    // Pin A, pin B, unpin C: all keys distinct, so one statement. B's lease is taken back
    // before the group is written: B is neither succeeded nor indexed nor recorded.
    let (_, ids) = store(
        &db,
        "alice",
        vec![
            job(backend.id, 0, Op::Pin, A),
            job(backend.id, 1, Op::Pin, B),
            job(backend.id, 2, Op::Unpin, C),
        ],
    )
    .await?;
    let claimed = claim(&db, &ids, worker).await?;
    assert_eq!(claimed.len(), 3);
    sqlx::query("UPDATE jobs SET state = 'queued', lease_owner = NULL WHERE id = $1")
        .bind(ids[1])
        .execute(&db.pool)
        .await?;
    let group: Vec<&ClaimedJob> = claimed.iter().collect();
    let written = db::finish_succeeded(&db.pool, &group, worker).await?;
    assert_eq!(written, vec![ids[0], ids[2]]);
    let states: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, state FROM jobs WHERE id = ANY($1) ORDER BY seq")
            .bind(&ids)
            .fetch_all(&db.pool)
            .await?;
    let states: Vec<&str> = states.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(states, ["succeeded", "queued", "succeeded"]);
    assert_eq!(
        pin_row(&db, backend.id, A).await?,
        Some(("alice".into(), ids[0]))
    );
    assert_eq!(
        pin_row(&db, backend.id, B).await?,
        None,
        "a lost lease writes no pin"
    );
    assert_eq!(pin_row(&db, backend.id, C).await?, None, "C was unpinned");
    let attempts: Vec<(Uuid, i32, String)> = sqlx::query_as(
        "SELECT job_id, attempt, outcome FROM job_attempts WHERE job_id = ANY($1) ORDER BY job_id",
    )
    .bind(&ids)
    .fetch_all(&db.pool)
    .await?;
    let mut expected = vec![
        (ids[0], 1, "succeeded".to_owned()),
        (ids[2], 1, "succeeded".to_owned()),
    ];
    expected.sort();
    assert_eq!(attempts, expected, "one record per written attempt");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successes_that_touch_one_pin_are_applied_in_order() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::now_v7();
    // Pin A, unpin A, pin A again in one group: the last one wins, as it would alone.
    let (ids, written) = run_as_one_group(
        &db,
        worker,
        vec![
            job(backend.id, 0, Op::Pin, A),
            job(backend.id, 1, Op::Unpin, A),
            job(backend.id, 2, Op::Pin, A),
        ],
    )
    .await?;
    assert_eq!(written, ids);
    assert_eq!(
        pin_row(&db, backend.id, A).await?,
        Some(("alice".into(), ids[2]))
    );

    // Pin B then unpin B: B ends unpinned.
    let (ids, written) = run_as_one_group(
        &db,
        worker,
        vec![
            job(backend.id, 0, Op::Pin, B),
            job(backend.id, 1, Op::Unpin, B),
        ],
    )
    .await?;
    assert_eq!(written, ids);
    assert_eq!(pin_row(&db, backend.id, B).await?, None);
    assert_eq!(db.count("job_attempts").await, 5);
    Ok(())
}
