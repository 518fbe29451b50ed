//! The worker's grouped writers against a real PostgreSQL: a batch stored in one
//! statement with its dispatch-outbox row, claims, and successes written in one
//! statement with their pin-index changes (each success recorded on its job's row),
//! fenced by the lease.

use std::time::Duration;

use pinq_core::cid::canonical_of;
use pinq_core::db::{self, ClaimedJob, NewBatch, NewJob, Outcome, RelayScan, Stored};
use pinq_core::model::{Op, Priority};
use pinq_core::retry::RetryPolicy;
use pinq_e2e::{TestDb, new_job, random_cid, relay_scan, relay_scan_limit, store_batch};
use uuid::Uuid;

const A: &str = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
const B: &str = "bafkreidvbhs33ighmljlvr7zbv2ywwzcmp5adtf4kqvlly67cy56bdtmve";
const C: &str = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
const V0: &str = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";

fn job(backend: Uuid, seq: i32, op: Op, cid: &str) -> NewJob {
    NewJob {
        name: Some(format!("job-{seq}")),
        ..new_job(backend, seq, op, cid)
    }
}

/// A job stored as the `cid_order` migration leaves jobs stored before it: keyed by the
/// CID as submitted, so two spellings of one CID have two keys.
fn legacy_job(backend: Uuid, seq: i32, op: Op, cid: &str) -> NewJob {
    NewJob {
        cid_key: cid.to_owned(),
        ..job(backend, seq, op, cid)
    }
}

fn replace_job(backend: Uuid, seq: i32, cid: &str, replaces: &str) -> NewJob {
    NewJob {
        replaces_cid: Some(replaces.to_owned()),
        replaces_key: canonical_of(replaces),
        ..job(backend, seq, Op::Replace, cid)
    }
}

async fn store(db: &TestDb, owner: &str, jobs: Vec<NewJob>) -> anyhow::Result<(Uuid, Vec<Uuid>)> {
    store_batch(&db.pool, owner, jobs).await
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
        request_digest: Some(b"request 1".to_vec()),
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
        Stored::Existing {
            id,
            job_count: 2,
            same_request: true
        }
    );
    // The same key with another request writes nothing either, and says the request
    // differs.
    let other = NewBatch {
        id: Uuid::now_v7(),
        request_digest: Some(b"request 2".to_vec()),
        ..batch.clone()
    };
    assert_eq!(
        db::insert_batch(&db.pool, &other).await?,
        Stored::Existing {
            id,
            job_count: 2,
            same_request: false
        }
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
    // A written success is its job's record, naming the worker. B was handed back above
    // by hand, without the record the relay would write, so it lists no attempt.
    let mut listed = Vec::new();
    for id in &ids {
        let attempts = db::job_attempts(&db.pool, *id).await?;
        listed.push(
            attempts
                .into_iter()
                .map(|a| (a.attempt, a.worker_id, a.outcome, a.finished_at.is_some()))
                .collect::<Vec<_>>(),
        );
    }
    let success = vec![(1, worker, Some("succeeded".to_owned()), true)];
    assert_eq!(
        listed,
        vec![success.clone(), vec![], success],
        "one attempt listed per written success"
    );
    assert_eq!(
        db.count("job_attempts").await,
        0,
        "a success writes no record"
    );
    Ok(())
}

/// Alice's group of two jobs stored before keys were canonical, on one pin: an unpin of
/// its v1 spelling, then a pin of V0. Returns their ids; both are written.
async fn unpin_then_pin(db: &TestDb, worker: Uuid, backend: Uuid) -> anyhow::Result<Vec<Uuid>> {
    let v1 = canonical_of(V0).expect("valid CID");
    let jobs = vec![
        legacy_job(backend, 0, Op::Unpin, &v1),
        legacy_job(backend, 1, Op::Pin, V0),
    ];
    let (ids, written) = run_as_one_group(db, worker, jobs).await?;
    assert_eq!(written, ids);
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successes_that_touch_one_pin_are_applied_in_order() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::now_v7();
    // Claims never hand out two jobs on one pin, except jobs stored before keys were
    // canonical: a CIDv0 and its CIDv1 spelling had two keys. Pin then unpin: both are
    // applied, in order. The unpin was claimed before the pin's row existed, when the
    // index held the pin for nobody, so it left the node's pin alone (a pin the index
    // does not know may have been made outside pinq): Alice's reference goes, and the row
    // stays, held by nobody in pinq.
    let v1 = canonical_of(V0).expect("valid CID");
    let (ids, written) = run_as_one_group(
        &db,
        worker,
        vec![
            legacy_job(backend.id, 0, Op::Pin, V0),
            legacy_job(backend.id, 1, Op::Unpin, &v1),
        ],
    )
    .await?;
    assert_eq!(written, ids);
    assert_eq!(
        refs(&db, backend.id, V0).await?,
        Some((None, vec![], None, None, "unmanaged".into()))
    );

    // Unpin then pin: the pin wins.
    let ids = unpin_then_pin(&db, worker, backend.id).await?;
    assert_eq!(
        pin_row(&db, backend.id, V0).await?,
        Some(("alice".into(), ids[1]))
    );
    let (by_worker,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE state = 'succeeded' AND succeeded_by = $1")
            .bind(worker)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        by_worker, 4,
        "each success applied in order names its worker"
    );
    assert_eq!(db.count("job_attempts").await, 0, "and writes no record");

    // Bob pins it too. Then Alice's group unpins (the v1 spelling) and pins again (V0),
    // one job at a time: her reference is released while Bob's keeps the row and takes
    // its place, then hers is added back.
    run_as(&db, "bob", worker, vec![job(backend.id, 0, Op::Pin, V0)]).await?;
    unpin_then_pin(&db, worker, backend.id).await?;
    assert_eq!(
        refs(&db, backend.id, V0).await?,
        Some((
            Some("bob".into()),
            vec!["bob".to_owned(), "alice".to_owned()],
            None,
            None,
            "pinned".into()
        ))
    );
    Ok(())
}

/// A pin-index row's references: (owner, owners, name, job, status).
type Refs = (
    Option<String>,
    Vec<String>,
    Option<String>,
    Option<Uuid>,
    String,
);

async fn refs(db: &TestDb, backend: Uuid, cid: &str) -> anyhow::Result<Option<Refs>> {
    Ok(sqlx::query_as(
        "SELECT owner, array_remove(ARRAY[owner] || coalesce(others, '{}'), NULL), name, job_id, status
         FROM pins WHERE backend_id = $1 AND cid = $2",
    )
    .bind(backend)
    .bind(canonical_of(cid).expect("valid CID"))
    .fetch_optional(&db.pool)
    .await?)
}

/// Stores the jobs as a batch of `owner`, claims them and writes their successes as one
/// group; returns what the claim handed the worker.
async fn run_as(
    db: &TestDb,
    owner: &str,
    worker: Uuid,
    jobs: Vec<NewJob>,
) -> anyhow::Result<Vec<ClaimedJob>> {
    let (_, ids) = store(db, owner, jobs).await?;
    let claimed = claim(db, &ids, worker).await?;
    assert_eq!(claimed.len(), ids.len(), "every job claimed");
    let group: Vec<&ClaimedJob> = claimed.iter().collect();
    assert_eq!(db::finish_succeeded(&db.pool, &group, worker).await?, ids);
    Ok(claimed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_owner_holds_its_own_reference_to_a_pin() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let b = backend.id;
    let worker = Uuid::now_v7();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    // Alice pins A, then Bob: two references; the row stays Alice's.
    let alice_pin = run_as(&db, "alice", worker, vec![job(b, 0, Op::Pin, A)]).await?;
    run_as(&db, "bob", worker, vec![job(b, 0, Op::Pin, A)]).await?;
    assert_eq!(
        refs(&db, b, A).await?,
        Some((
            Some("alice".into()),
            s(&["alice", "bob"]),
            Some("job-0".into()),
            Some(alice_pin[0].id),
            "pinned".into()
        ))
    );
    // Pinning again adds no second reference.
    run_as(&db, "bob", worker, vec![job(b, 0, Op::Pin, A)]).await?;
    assert_eq!(
        refs(&db, b, A).await?.map(|r| r.1),
        Some(s(&["alice", "bob"]))
    );

    // Carol holds none: her unpin (the API refuses it for a user token) leaves the node's
    // pin and every reference alone.
    let carol = run_as(&db, "carol", worker, vec![job(b, 0, Op::Unpin, A)]).await?;
    assert!(carol[0].others_hold && !carol[0].unpins_on_node());
    assert_eq!(
        refs(&db, b, A).await?.map(|r| r.1),
        Some(s(&["alice", "bob"]))
    );

    // Alice's unpin takes her reference only; Bob's is now the row's first.
    let alice = run_as(&db, "alice", worker, vec![job(b, 0, Op::Unpin, A)]).await?;
    assert!(alice[0].others_hold && !alice[0].unpins_on_node());
    // It does not call the node at all, so a backend held down does not hold it up.
    assert!(!alice[0].calls_node());
    assert_eq!(
        refs(&db, b, A).await?,
        Some((Some("bob".into()), s(&["bob"]), None, None, "pinned".into()))
    );

    // Bob's is the last: the node unpins and the row goes.
    let bob = run_as(&db, "bob", worker, vec![job(b, 0, Op::Unpin, A)]).await?;
    assert!(!bob[0].others_hold && bob[0].unpins_on_node() && bob[0].calls_node());
    assert_eq!(refs(&db, b, A).await?, None);

    // An unpin for every owner (an admin's) unpins on the node whoever holds the pin.
    run_as(&db, "alice", worker, vec![job(b, 0, Op::Pin, B)]).await?;
    run_as(&db, "bob", worker, vec![job(b, 0, Op::Pin, B)]).await?;
    let all = NewJob {
        unpin_all: true,
        ..job(b, 0, Op::Unpin, B)
    };
    let ops = run_as(&db, "ops", worker, vec![all]).await?;
    assert!(!ops[0].others_hold && ops[0].unpins_on_node());
    assert_eq!(refs(&db, b, B).await?, None);

    // A replace moves its owner's reference: Alice replaces C, which Bob also holds, by
    // B. The node keeps C for Bob.
    run_as(&db, "alice", worker, vec![job(b, 0, Op::Pin, C)]).await?;
    run_as(&db, "bob", worker, vec![job(b, 0, Op::Pin, C)]).await?;
    let moved = run_as(&db, "alice", worker, vec![replace_job(b, 0, B, C)]).await?;
    assert!(moved[0].others_hold && !moved[0].unpins_on_node() && moved[0].calls_node());
    assert_eq!(refs(&db, b, C).await?.map(|r| r.1), Some(s(&["bob"])));
    assert_eq!(refs(&db, b, B).await?.map(|r| r.1), Some(s(&["alice"])));
    // A replace of a CID by another spelling of it unpins nothing.
    let v1 = canonical_of(V0).expect("valid CID");
    run_as(&db, "alice", worker, vec![job(b, 0, Op::Pin, V0)]).await?;
    let respelled = run_as(&db, "alice", worker, vec![replace_job(b, 0, &v1, V0)]).await?;
    assert_eq!(respelled[0].removes(), None);
    assert_eq!(refs(&db, b, V0).await?.map(|r| r.1), Some(s(&["alice"])));

    // A pin found on the node outside pinq has no reference: a pin takes it over.
    let d = random_cid();
    sqlx::query("INSERT INTO pins (backend_id, cid, status) VALUES ($1, $2, 'unmanaged')")
        .bind(b)
        .bind(canonical_of(&d).expect("valid CID"))
        .execute(&db.pool)
        .await?;
    // Nobody in pinq holds it: an unpin leaves it on the node (a user token's is refused
    // at submission; this one is a Pinning Service API delete's whose pin had failed).
    let outside = run_as(&db, "alice", worker, vec![job(b, 0, Op::Unpin, &d)]).await?;
    assert!(outside[0].others_hold && !outside[0].unpins_on_node());
    assert_eq!(
        refs(&db, b, &d).await?,
        Some((None, vec![], None, None, "unmanaged".into()))
    );
    let took = run_as(&db, "bob", worker, vec![job(b, 0, Op::Pin, &d)]).await?;
    assert_eq!(
        refs(&db, b, &d).await?,
        Some((
            Some("bob".into()),
            s(&["bob"]),
            Some("job-0".into()),
            Some(took[0].id),
            "pinned".into()
        ))
    );

    // Nor does an unpin of a pin the index does not know (made outside pinq and not
    // listed yet, or never made): the node is not asked, and no row appears.
    let e = random_cid();
    let unknown = run_as(&db, "alice", worker, vec![job(b, 0, Op::Unpin, &e)]).await?;
    assert!(unknown[0].others_hold && !unknown[0].unpins_on_node() && !unknown[0].calls_node());
    assert_eq!(refs(&db, b, &e).await?, None);
    // But an owner whose own pin of it called the node and ended without a recorded
    // success (cancelled while it ran, or failed) may have left it pinned there: that
    // owner's unpin asks the node. Another owner's still does not.
    let g = random_cid();
    let (_, pin) = store(&db, "alice", vec![job(b, 0, Op::Pin, &g)]).await?;
    let ran = claim(&db, &pin, worker).await?;
    assert!(db::finish_job(&db.pool, &ran[0], worker, &Outcome::Cancelled).await?);
    assert_eq!(refs(&db, b, &g).await?, None);
    let bobs = run_as(&db, "bob", worker, vec![job(b, 0, Op::Unpin, &g)]).await?;
    assert!(bobs[0].others_hold && !bobs[0].calls_node());
    let alices = run_as(&db, "alice", worker, vec![job(b, 0, Op::Unpin, &g)]).await?;
    assert!(!alices[0].others_hold && alices[0].unpins_on_node());
    assert_eq!(refs(&db, b, &g).await?, None);
    // That unpin settled it: a pin of it made later outside pinq is not hers.
    let again = run_as(&db, "alice", worker, vec![job(b, 0, Op::Unpin, &g)]).await?;
    assert!(again[0].others_hold && !again[0].calls_node());

    // The same once the index update has listed such a pin, held by nobody in pinq: her
    // unpin may be submitted with a user token and asks the node, and the row goes.
    let h = random_cid();
    let (_, pin) = store(&db, "alice", vec![job(b, 0, Op::Pin, &h)]).await?;
    let ran = claim(&db, &pin, worker).await?;
    let failed = Outcome::Failed {
        error: "timed out".into(),
    };
    assert!(db::finish_job(&db.pool, &ran[0], worker, &failed).await?);
    sqlx::query("INSERT INTO pins (backend_id, cid, status) VALUES ($1, $2, 'unmanaged')")
        .bind(b)
        .bind(canonical_of(&h).expect("valid CID"))
        .execute(&db.pool)
        .await?;
    let pair = vec![(b, canonical_of(&h).expect("valid CID"))];
    assert!(
        db::pins_not_owned_by(&db.pool, "alice", &pair)
            .await?
            .is_empty()
    );
    assert_eq!(
        db::pins_not_owned_by(&db.pool, "bob", &pair).await?.len(),
        1
    );
    let alices = run_as(&db, "alice", worker, vec![job(b, 0, Op::Unpin, &h)]).await?;
    assert!(!alices[0].others_hold && alices[0].unpins_on_node());
    assert_eq!(refs(&db, b, &h).await?, None);

    // A replace of such a pin pins the new CID and leaves the old one alone.
    let f = random_cid();
    let replaced = run_as(&db, "alice", worker, vec![replace_job(b, 0, &f, &e)]).await?;
    assert!(replaced[0].others_hold && !replaced[0].unpins_on_node() && replaced[0].calls_node());
    assert_eq!(refs(&db, b, &e).await?, None);
    Ok(())
}

/// Of these jobs, the parked ones: (id, state, blocked_by, no retry timer).
async fn parked(
    db: &TestDb,
    ids: &[Uuid],
) -> anyhow::Result<Vec<(Uuid, String, Option<Uuid>, bool)>> {
    Ok(sqlx::query_as(
        "SELECT id, state, blocked_by, retry_at IS NULL FROM jobs
         WHERE id = ANY($1) AND blocked_by IS NOT NULL ORDER BY submit_seq",
    )
    .bind(ids)
    .fetch_all(&db.pool)
    .await?)
}

/// The claim's per-key order (see `db::claim_jobs`): which jobs it parks, and when the
/// relay gives them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_on_one_cid_are_claimed_one_at_a_time_in_submission_order() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let other = db::insert_backend(&db.pool, "c", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::now_v7();
    let v1 = canonical_of(V0).expect("valid CID");
    // Pin V0; unpin it spelled as CIDv1; pin A; pin V0 on another backend; replace A by B.
    let (_, ids) = store(
        &db,
        "alice",
        vec![
            job(backend.id, 0, Op::Pin, V0),
            job(backend.id, 1, Op::Unpin, &v1),
            job(backend.id, 2, Op::Pin, A),
            job(other.id, 3, Op::Pin, V0),
            replace_job(backend.id, 4, B, A),
        ],
    )
    .await?;

    // One claim of all five: the first job of each key runs; the unpin waits for the pin
    // (one key for both spellings), and the replace for the pin of what it replaces.
    let claimed = claim(&db, &ids, worker).await?;
    let running: Vec<Uuid> = claimed.iter().map(|j| j.id).collect();
    assert_eq!(running, vec![ids[0], ids[2], ids[3]]);
    assert_eq!(
        parked(&db, &ids).await?,
        vec![
            (ids[1], "retry_wait".to_owned(), Some(ids[0]), true),
            (ids[4], "retry_wait".to_owned(), Some(ids[2]), true),
        ]
    );
    let shown = db::get_job(&db.pool, ids[1], None)
        .await?
        .expect("the job exists");
    assert_eq!(shown.attempt, 0, "parking spends no attempt");
    assert_eq!(
        shown.waiting_for,
        Some(ids[0]),
        "the job says what it waits for"
    );
    assert!(
        shown
            .last_error
            .is_some_and(|e| e.contains(&ids[0].to_string())),
        "and why"
    );

    // Nothing is given back while the blockers run, and due retries do not take parked jobs.
    assert!(
        relay_scan(&db.pool, RelayScan::Unblocked { after: Uuid::nil() })
            .await?
            .1
            .is_empty()
    );
    assert!(
        relay_scan(&db.pool, RelayScan::DueRetries)
            .await?
            .1
            .is_empty()
    );

    // The pin of V0 ends: its unpin is given back, and the replace still waits.
    let first: Vec<&ClaimedJob> = claimed.iter().filter(|j| j.id == ids[0]).collect();
    assert_eq!(
        db::finish_succeeded(&db.pool, &first, worker).await?,
        vec![ids[0]]
    );
    let (_, requeued) = relay_scan(&db.pool, RelayScan::Unblocked { after: Uuid::nil() }).await?;
    assert_eq!(requeued, vec![ids[1]]);
    let (state, blocked, error): (String, Option<Uuid>, Option<String>) =
        sqlx::query_as("SELECT state, blocked_by, last_error FROM jobs WHERE id = $1")
            .bind(ids[1])
            .fetch_one(&db.pool)
            .await?;
    assert_eq!((state.as_str(), blocked, error), ("queued", None, None));
    let (owed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM dispatch_outbox WHERE $1 = ANY(job_ids) AND published_at IS NULL",
    )
    .bind(ids[1])
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(owed, 1, "the requeued job is owed a message");

    // Its next claim runs it; a later job on the same key now waits for it, although that
    // job was submitted later and is already running: running work is never overlapped.
    let (_, later) = store(&db, "alice", vec![job(backend.id, 0, Op::Pin, &v1)]).await?;
    let unpin = claim(&db, &ids[1..2], worker).await?;
    assert_eq!(unpin.len(), 1);
    assert!(claim(&db, &later, worker).await?.is_empty());
    assert_eq!(
        parked(&db, &later).await?,
        vec![(later[0], "retry_wait".to_owned(), Some(ids[1]), true)]
    );
    Ok(())
}

/// A job parked behind a later one that runs (the earlier job was failed and re-driven
/// while the later one ran) is given back once that later job goes back to wait without
/// finishing: otherwise the later job, claimed again, would park behind the earlier, and
/// the two would wait for each other for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_on_one_cid_never_wait_for_each_other() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::now_v7();
    let state_of = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            let row: (String, Option<Uuid>) =
                sqlx::query_as("SELECT state, blocked_by FROM jobs WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await?;
            anyhow::Ok(row)
        }
    };

    // The earlier job fails; the later one, on the same CID, is claimed and runs.
    let (_, earlier) = store(&db, "alice", vec![job(backend.id, 0, Op::Pin, A)]).await?;
    let first = claim(&db, &earlier, worker).await?;
    let failed = Outcome::Failed {
        error: "gone".into(),
    };
    assert!(db::finish_job(&db.pool, &first[0], worker, &failed).await?);
    let (_, later) = store(&db, "alice", vec![job(backend.id, 0, Op::Pin, A)]).await?;
    let running = claim(&db, &later, worker).await?;
    assert_eq!(running.len(), 1);

    // The earlier job is re-driven and claimed: it parks behind the running later one.
    assert!(
        db::redrive_failed(&db.pool, Some(earlier[0]), None, None)
            .await?
            .is_some()
    );
    assert!(claim(&db, &earlier, worker).await?.is_empty());
    assert_eq!(
        state_of(earlier[0]).await?,
        ("retry_wait".to_owned(), Some(later[0]))
    );

    // The later job's attempt ends in a retry; when due, it is claimed again and parks
    // behind the earlier job, which waits and was submitted first.
    let retry = Outcome::Retry {
        error: "busy".into(),
        run_at: chrono::Utc::now() - chrono::Duration::seconds(1),
    };
    assert!(db::finish_job(&db.pool, &running[0], worker, &retry).await?);
    let (_, due) = relay_scan(&db.pool, RelayScan::DueRetries).await?;
    assert_eq!(due, later);
    assert!(claim(&db, &later, worker).await?.is_empty());
    assert_eq!(
        state_of(later[0]).await?,
        ("retry_wait".to_owned(), Some(earlier[0]))
    );

    // The earlier job is given back (its blocker waits, and came later); the later one
    // still waits for it. The earlier job then runs, and once it ends the later one goes.
    let (_, given) = relay_scan(&db.pool, RelayScan::Unblocked { after: Uuid::nil() }).await?;
    assert_eq!(given, earlier, "the earlier job is no longer held");
    let again = claim(&db, &earlier, worker).await?;
    assert_eq!(again.len(), 1, "and runs");
    let group: Vec<&ClaimedJob> = again.iter().collect();
    assert_eq!(
        db::finish_succeeded(&db.pool, &group, worker).await?,
        earlier
    );
    let (_, given) = relay_scan(&db.pool, RelayScan::Unblocked { after: Uuid::nil() }).await?;
    assert_eq!(given, later);
    assert_eq!(claim(&db, &later, worker).await?.len(), 1);
    db.check_tallies().await?;
    Ok(())
}

/// A job whose cancellation was requested while it ran, and whose worker died before it
/// could stop it, ends `cancelled` when the relay takes its expired lease back: it is not
/// queued to run again, and no message is owed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_outlives_the_worker_that_held_the_job() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::now_v7();
    let (_, ids) = store(
        &db,
        "alice",
        vec![
            job(backend.id, 0, Op::Pin, A),
            job(backend.id, 1, Op::Pin, B),
        ],
    )
    .await?;
    let claimed = claim(&db, &ids, worker).await?;
    assert_eq!(claimed.len(), 2);
    assert_eq!(
        db::cancel_job(&db.pool, ids[0], None).await?,
        Some(db::CancelResult::Requested)
    );
    // The worker dies: its claim's lease runs out, and the relay takes the jobs back.
    sqlx::query("UPDATE job_claims SET lease_until = now() - interval '1 second'")
        .execute(&db.pool)
        .await?;
    let (_, requeued) = relay_scan(&db.pool, RelayScan::ExpiredLeases).await?;
    assert_eq!(requeued.len(), 2);
    let states: Vec<(Uuid, String, bool)> = sqlx::query_as(
        "SELECT id, state, finished_at IS NOT NULL FROM jobs WHERE id = ANY($1) ORDER BY seq",
    )
    .bind(&ids)
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        states,
        vec![
            (ids[0], "cancelled".to_owned(), true),
            (ids[1], "queued".to_owned(), false),
        ]
    );
    let attempts: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT job_id, outcome FROM job_attempts WHERE job_id = ANY($1) ORDER BY job_id = $2 DESC",
    )
    .bind(&ids)
    .bind(ids[0])
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        attempts,
        vec![
            (ids[0], "cancelled".to_owned()),
            (ids[1], "lost".to_owned())
        ]
    );
    let owed: Vec<(Vec<Uuid>,)> =
        sqlx::query_as("SELECT job_ids FROM dispatch_outbox WHERE published_at IS NULL")
            .fetch_all(&db.pool)
            .await?;
    assert!(
        owed.iter().all(|(jobs,)| !jobs.contains(&ids[0])),
        "no message is owed for the cancelled job: {owed:?}"
    );
    assert!(
        owed.iter().any(|(jobs,)| jobs.contains(&ids[1])),
        "the other job is owed its message: {owed:?}"
    );
    // Nothing can claim it again.
    assert!(claim(&db, &ids[..1], worker).await?.is_empty());
    db.check_tallies().await?;
    Ok(())
}

/// The unblocked scan reads one page of parked jobs a pass, in the order of the jobs they
/// wait for, so a pass costs the same however many jobs are parked. A job whose blocker
/// has ended is given back by the pass that reaches its page; jobs parked behind one
/// blocker are never split between pages; after the last page the scan starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unblocked_scan_reads_one_page_of_parked_jobs_a_pass() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let backend = db::insert_backend(&db.pool, "b", "kubo", "http://127.0.0.1:9").await?;
    let worker = Uuid::now_v7();
    let cids: Vec<String> = (0..30).map(|_| random_cid()).collect();
    let of = |op: Op| -> Vec<NewJob> {
        cids.iter()
            .enumerate()
            .map(|(i, c)| job(backend.id, i as i32, op, c))
            .collect()
    };
    let (_, pins) = store(&db, "alice", of(Op::Pin)).await?;
    let (_, unpins) = store(&db, "alice", of(Op::Unpin)).await?;
    let running = claim(&db, &pins, worker).await?;
    assert_eq!(running.len(), 30);
    assert!(claim(&db, &unpins, worker).await?.is_empty());
    // (blocker, parked job) in the scan's order.
    let order: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT blocked_by, id FROM jobs WHERE blocked_by IS NOT NULL ORDER BY blocked_by",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(order.len(), 30, "every unpin is parked behind its pin");
    // Two jobs behind one blocker at the end of the first page of ten (as after a cancel
    // of the job between them).
    sqlx::query("UPDATE jobs SET blocked_by = $1 WHERE id = $2")
        .bind(order[9].0)
        .bind(order[10].1)
        .execute(&db.pool)
        .await?;
    let end = |blockers: Vec<Uuid>| {
        let done: Vec<ClaimedJob> = running
            .iter()
            .filter(|j| blockers.contains(&j.id))
            .cloned()
            .collect();
        let pool = db.pool.clone();
        async move {
            let done: Vec<&ClaimedJob> = done.iter().collect();
            db::finish_succeeded(&pool, &done, worker).await
        }
    };
    assert_eq!(
        end(vec![order[0].0, order[9].0, order[29].0]).await?.len(),
        3
    );
    let sorted = |mut v: Vec<Uuid>| {
        v.sort();
        v
    };
    let page = |after: Uuid| relay_scan_limit(&db.pool, RelayScan::Unblocked { after }, 10);

    // First page: its ended blockers' jobs, both of the pair; the last page's not yet.
    let (take, got) = page(Uuid::nil()).await?;
    assert_eq!(
        sorted(got),
        sorted(vec![order[0].1, order[9].1, order[10].1])
    );
    assert_eq!(take.resume_after, Some(order[9].0));
    // Second page: the next ten still parked (order[10]'s job has gone with the pair);
    // nothing of it has ended.
    let (take, got) = page(order[9].0).await?;
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(take.resume_after, Some(order[20].0));
    // Third and last page (nine jobs): the last blocker's job; the next pass starts again
    // from the beginning, where a blocker that has ended since is found.
    let (take, got) = page(order[20].0).await?;
    assert_eq!(got, vec![order[29].1]);
    assert_eq!(take.resume_after, None);
    assert_eq!(end(vec![order[5].0]).await?.len(), 1);
    let (_, got) = page(Uuid::nil()).await?;
    assert_eq!(got, vec![order[5].1]);
    // A pass that starts past the last blocker (the page before it was full) reads the
    // first page instead of nothing.
    assert_eq!(end(vec![order[3].0]).await?.len(), 1);
    let (_, got) = page(order[29].0).await?;
    assert_eq!(got, vec![order[3].1]);
    Ok(())
}

/// The `pin_owners` migration, on data of the schema before it: the references the old
/// index did not record become `others`, and unpins that may still run keep removing the
/// pin for everyone when their owner holds none, as they did when they were submitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pin_owners_migration_records_the_holders_the_old_index_missed() -> anyhow::Result<()> {
    let db = TestDb::create_migrated_to(20261127000008).await?;
    let b = db.insert_backend_row("b").await?;
    let c = db.insert_backend_row("c").await?;
    let (x, y, u) = (random_cid(), random_cid(), random_cid());
    let key = |c: &str| canonical_of(c).expect("valid CID");
    for (cid, owner, status) in [
        (&x, Some("alice"), "pinned"),
        (&y, Some("alice"), "pinned"),
        (&u, None, "unmanaged"),
    ] {
        sqlx::query("INSERT INTO pins (backend_id, cid, owner, status) VALUES ($1, $2, $3, $4)")
            .bind(b)
            .bind(key(cid))
            .bind(owner)
            .bind(status)
            .execute(&db.pool)
            .await?;
    }
    // Live requests: Carol's for x on b counts; Frank's deleted one and Gina's on another
    // backend do not, nor Carol's for the unmanaged u; Alice's own are no `others`.
    for (owner, cid, backends, deleted) in [
        ("carol", &x, vec!["b"], false),
        ("alice", &x, vec!["b"], false),
        ("frank", &x, vec!["b"], true),
        ("gina", &x, vec!["other"], false),
        ("carol", &u, vec!["b"], false),
        ("alice", &y, vec!["b"], false),
    ] {
        sqlx::query(
            "INSERT INTO pin_requests (id, owner, cid, cid_canonical, batch_id, backends,
                                       deleted_at)
             VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $7 THEN now() END)",
        )
        .bind(Uuid::now_v7())
        .bind(owner)
        .bind(cid)
        .bind(key(cid))
        .bind(Uuid::now_v7())
        .bind(backends)
        .bind(deleted)
        .execute(&db.pool)
        .await?;
    }
    let batch = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO batches (id, owner, priority, backends, retry, job_count)
         VALUES ($1, 'mixed', 5, ARRAY['b'], '{}', 0)",
    )
    .bind(batch)
    .execute(&db.pool)
    .await?;
    // One statement a job, so that `submit_seq` and `finished_at` follow this order.
    let jobs = [
        ("dave", "pin", &x, None, "succeeded", b),
        // Ends Dave's pin (and any other before it): every unpin removed it from the node.
        ("dave", "unpin", &x, None, "succeeded", b),
        ("bob", "pin", &x, None, "succeeded", b),
        ("hank", "pin", &y, None, "succeeded", b),
        // Erin's replace pins x and ends Hank's pin of y.
        ("erin", "replace", &x, Some(&y), "succeeded", b),
        ("ivan", "pin", &x, None, "failed", b),
        // Neither a failed unpin nor one on another backend ends Bob's or Erin's pin.
        ("zed", "unpin", &x, None, "failed", b),
        ("kim", "unpin", &x, None, "succeeded", c),
        // Pending removals by owners that hold nothing, and by one that does (Bob).
        ("jo", "unpin", &y, None, "queued", b),
        ("jo", "unpin", &u, None, "failed", b),
        ("jo", "replace", &u, Some(&y), "retry_wait", b),
        ("jo", "pin", &u, None, "queued", b),
        ("bob", "unpin", &x, None, "queued", b),
    ];
    let mut ids = Vec::new();
    for (n, (owner, op, cid, replaces, state, backend)) in jobs.into_iter().enumerate() {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO jobs (id, batch_id, seq, owner, backend_id, op, cid, replaces_cid,
                               priority, state, max_attempts, backoff_base_ms, backoff_factor,
                               backoff_max_ms, cid_key, replaces_key, finished_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 5, $9, 3, 100, 2, 1000, $10, $11,
                     CASE WHEN $9 IN ('succeeded', 'failed') THEN clock_timestamp() END)",
        )
        .bind(id)
        .bind(batch)
        .bind(n as i32)
        .bind(owner)
        .bind(backend)
        .bind(op)
        .bind(cid)
        .bind(replaces)
        .bind(state)
        .bind(key(cid))
        .bind(replaces.map(|r| key(r)))
        .execute(&db.pool)
        .await?;
        ids.push(id);
    }

    db::MIGRATOR.run(&db.pool).await?;

    let holders = |cid: &str| {
        let k = key(cid);
        let pool = db.pool.clone();
        async move {
            let row: (Option<String>, Option<Vec<String>>) =
                sqlx::query_as("SELECT owner, others FROM pins WHERE backend_id = $1 AND cid = $2")
                    .bind(b)
                    .bind(k)
                    .fetch_one(&pool)
                    .await?;
            anyhow::Ok(row)
        }
    };
    assert_eq!(
        holders(&x).await?,
        (
            Some("alice".into()),
            Some(vec!["bob".into(), "carol".into(), "erin".into()])
        )
    );
    // Only Alice's own request holds y: no others, not an empty list.
    assert_eq!(holders(&y).await?, (Some("alice".into()), None));
    assert_eq!(holders(&u).await?, (None, None));
    let flags: Vec<(Uuid, bool)> = sqlx::query_as("SELECT id, unpin_all FROM jobs")
        .fetch_all(&db.pool)
        .await?;
    let flags: std::collections::HashMap<Uuid, bool> = flags.into_iter().collect();
    let flagged: Vec<usize> = (0..ids.len()).filter(|n| flags[&ids[*n]]).collect();
    // Zed's failed unpin and Jo's pending removals; not finished ones, pins, nor Bob's.
    assert_eq!(flagged, [6, 8, 9, 10]);
    Ok(())
}

/// A job's successful attempt is recorded on its row (`succeeded_by`), not in
/// `job_attempts`. The migration that made it so keeps the records of earlier successes
/// and drops a record the first scheme's claim opened for an attempt still running, whose
/// record is now its row; the listing then shows each attempt once, either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successes_are_listed_once_from_their_records_or_their_rows() -> anyhow::Result<()> {
    let db = TestDb::create_migrated_to(20261127000011).await?;
    let backend = db.insert_backend_row("b").await?;
    let jobs = (0..4)
        .map(|s| job(backend, s, Op::Pin, &random_cid()))
        .collect();
    let (_, ids) = store(&db, "alice", jobs).await?;
    let worker = Uuid::now_v7();
    let claimed = claim(&db, &ids, worker).await?;
    assert_eq!(claimed.len(), 4);
    // Before the migration: job 0 succeeded with a record, as successes were written then;
    // job 1 has a record opened by a claim of the first scheme; jobs 2 and 3 just run.
    sqlx::query(
        "WITH done AS (
             UPDATE jobs SET state = 'succeeded', lease_owner = NULL, finished_at = now()
             WHERE id = $1 RETURNING id, attempt, started_at, finished_at
         )
         INSERT INTO job_attempts (job_id, attempt, worker_id, started_at, finished_at, outcome)
         SELECT id, attempt, $3, started_at, finished_at, 'succeeded' FROM done
         UNION ALL
         SELECT id, attempt, $3, started_at, NULL, NULL FROM jobs WHERE id = $2",
    )
    .bind(ids[0])
    .bind(ids[1])
    .bind(worker)
    .execute(&db.pool)
    .await?;
    db::MIGRATOR.run(&db.pool).await?;

    let listed = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            let rows = db::job_attempts(&pool, id).await?;
            anyhow::Ok(
                rows.into_iter()
                    .map(|a| (a.attempt, a.worker_id, a.outcome, a.finished_at.is_some()))
                    .collect::<Vec<_>>(),
            )
        }
    };
    let success = vec![(1, worker, Some("succeeded".to_owned()), true)];
    let running = vec![(1, worker, None, false)];
    assert_eq!(listed(ids[0]).await?, success, "the old record is kept");
    let (open,): (i64,) = sqlx::query_as("SELECT count(*) FROM job_attempts WHERE job_id = $1")
        .bind(ids[1])
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(open, 0, "the open record is gone");
    assert_eq!(listed(ids[1]).await?, running, "listed from the row");
    assert_eq!(listed(ids[2]).await?, running);

    // Jobs 1 and 2 succeed now as a group, job 3 alone: on their rows, with no new record.
    let group = vec![&claimed[1], &claimed[2]];
    assert_eq!(
        db::finish_succeeded(&db.pool, &group, worker).await?,
        vec![ids[1], ids[2]]
    );
    assert!(db::finish_job(&db.pool, &claimed[3], worker, &db::Outcome::Succeeded).await?);
    for id in &ids {
        assert_eq!(listed(*id).await?, success);
    }
    assert_eq!(
        db.count("job_attempts").await,
        1,
        "only the old success's record"
    );
    Ok(())
}
