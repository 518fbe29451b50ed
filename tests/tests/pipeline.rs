//! The pinning pipeline end to end: HTTP in, PostgreSQL, RabbitMQ, workers, a real IPFS
//! node out. Every test runs the real binaries against real services.

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use pinq_core::amqp::JobMessage;
use pinq_core::cid::canonical_of;
use pinq_e2e::{FaultProxy, Stack, random_cid, unique_contents};
use serde_json::{Value, json};
use uuid::Uuid;

fn pin_ops(cids: &[String], op: &str) -> Vec<Value> {
    cids.iter()
        .enumerate()
        .map(|(i, c)| json!({"op": op, "cid": c, "name": format!("item-{i}")}))
        .collect()
}

fn canonical(cids: &[String]) -> HashSet<String> {
    cids.iter()
        .map(|c| canonical_of(c).expect("node returned valid CIDs"))
        .collect()
}

/// Respells a CIDv0 as CIDv1 in base32, so batches mix both spellings.
fn as_v1(cid: &str) -> String {
    canonical_of(cid).expect("valid CID")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_500_then_unpins_half_on_a_real_node() -> anyhow::Result<()> {
    let stack = Stack::full(2).await?;
    let ipfs = stack.ipfs();
    let cids = ipfs.add_unpinned(&unique_contents(500)).await?;
    assert!(ipfs.pins().await?.is_empty(), "a fresh node holds no pins");

    // Every other CID is submitted in its CIDv1 base32 spelling.
    let submitted: Vec<String> = cids
        .iter()
        .enumerate()
        .map(|(i, c)| if i % 2 == 0 { c.clone() } else { as_v1(c) })
        .collect();
    let id = stack
        .submit_ok(
            &json!({"priority": 5, "backends": ["local"], "ops": pin_ops(&submitted, "pin")}),
        )
        .await?;
    let done = stack.wait_done(id, Duration::from_secs(180)).await?;
    assert_eq!(done["counts"]["succeeded"], 500, "{done}");
    assert_eq!(done["counts"]["failed"], 0, "{done}");

    let expected = canonical(&cids);
    assert_eq!(
        ipfs.pins().await?,
        expected,
        "the node holds exactly the pinned CIDs"
    );
    assert_eq!(
        stack.pin_index("local").await?,
        expected,
        "the pin index agrees with the node"
    );

    let (unpin, keep) = cids.split_at(250);
    let id = stack
        .submit_ok(&json!({"backends": ["local"], "ops": pin_ops(unpin, "unpin")}))
        .await?;
    let done = stack.wait_done(id, Duration::from_secs(180)).await?;
    assert_eq!(done["counts"]["succeeded"], 250, "{done}");

    let kept = canonical(keep);
    assert_eq!(
        ipfs.pins().await?,
        kept,
        "exactly the other half is still pinned"
    );
    assert_eq!(
        stack.pin_index("local").await?,
        kept,
        "the pin index agrees with the node"
    );

    // Each job ran exactly once.
    let (max_attempt,): (i32,) = sqlx::query_as("SELECT max(attempt) FROM jobs")
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(max_attempt, 1);
    stack.db.check_tallies().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_batches_are_rejected_and_store_nothing() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    // The backend is never called: nothing in this test is accepted.
    stack
        .register_backend("local", "http://127.0.0.1:9")
        .await?;
    let good = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";

    struct Case {
        what: &'static str,
        body: String,
        status: u16,
        /// Text the error must contain (path or message), proving it names the problem.
        names: Vec<&'static str>,
    }
    let many: Vec<Value> = (0..10_001)
        .map(|_| json!({"op": "pin", "cid": good}))
        .collect();
    let cases = vec![
        Case {
            what: "invalid CIDs",
            body: json!({"ops": [{"op":"pin","cid":good},{"op":"pin","cid":"QmNotACid"},{"op":"pin","cid":""}]}).to_string(),
            status: 400,
            names: vec!["/ops/1/cid", "/ops/2/cid", "not a valid CID"],
        },
        Case {
            what: "a path instead of a CID",
            body: json!({"ops": [{"op":"pin","cid":format!("x/ipfs/{good}")},{"op":"pin","cid":format!("/ipfs/{good}")}]}).to_string(),
            status: 400,
            names: vec!["/ops/0/cid", "/ops/1/cid", "not a path"],
        },
        Case {
            what: "an unknown op",
            body: json!({"ops": [{"op":"pin","cid":good},{"op":"frobnicate","cid":good}]}).to_string(),
            status: 400,
            names: vec!["/ops/1/op", "unknown op 'frobnicate'"],
        },
        Case {
            what: "priority 12",
            body: json!({"priority": 12, "ops": [{"op":"pin","cid":good}]}).to_string(),
            status: 400,
            names: vec!["/priority", "0 to 9"],
        },
        Case {
            what: "an unknown backend",
            body: json!({"backends": ["local", "nowhere"], "ops": [{"op":"pin","cid":good}]}).to_string(),
            status: 400,
            names: vec!["/backends/1", "unknown backend 'nowhere'"],
        },
        Case {
            what: "10,001 ops",
            body: json!({"ops": many}).to_string(),
            status: 413,
            names: vec!["at most 10000 operations", "10001"],
        },
        Case {
            what: "malformed JSON",
            body: r#"{"ops": [{"op": "pin", "cid": }]}"#.to_string(),
            status: 400,
            names: vec!["malformed_json", "line 1"],
        },
        Case {
            what: "no ops",
            body: json!({"ops": []}).to_string(),
            status: 400,
            names: vec!["/ops", "at least one"],
        },
    ];
    for case in cases {
        let resp = stack
            .req(reqwest::Method::POST, "/v1/batches")
            .header("content-type", "application/json")
            .body(case.body.clone())
            .send()
            .await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        assert_eq!(status, case.status, "{}: {text}", case.what);
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: error body is not JSON ({e}): {text}", case.what));
        assert!(body["error"]["code"].is_string(), "{}: {text}", case.what);
        assert!(
            body["error"]["message"].is_string(),
            "{}: {text}",
            case.what
        );
        for needle in &case.names {
            assert!(
                text.contains(needle),
                "{}: error should mention {needle:?}: {text}",
                case.what
            );
        }
    }

    // Without a token, or with a wrong one: 401 with a JSON error.
    let resp = stack
        .http
        .post(format!("{}/v1/batches", stack.api_url))
        .json(&json!({"ops": [{"op":"pin","cid":good}]}))
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.json::<Value>().await?["error"]["code"], "unauthorized");
    let resp = stack
        .http
        .get(format!("{}/v1/batches", stack.api_url))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await?;
    assert_eq!(resp.status(), 401);

    assert_eq!(
        stack.db.count("batches").await,
        0,
        "no rejected batch was stored"
    );
    assert_eq!(
        stack.db.count("jobs").await,
        0,
        "no job of a rejected batch was stored"
    );

    // The same valid op is accepted, proving the rejections were about the input.
    stack
        .submit_ok(&json!({"ops": [{"op":"pin","cid":good}]}))
        .await?;
    assert_eq!(stack.db.count("jobs").await, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_delivery_does_not_run_the_job_twice() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_scheduler()?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(1)).await?;
    let batch = stack
        .submit_ok(&json!({"ops": [{"op": "pin", "cid": cids[0]}]}))
        .await?;
    let (job_id,): (Uuid,) = sqlx::query_as("SELECT id FROM jobs WHERE batch_id = $1")
        .bind(batch)
        .fetch_one(&stack.db.pool)
        .await?;
    // Wait for the regular message to be confirmed, then put two more copies beside it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Its dispatch-outbox entry is marked published once the broker has confirmed
        // the message.
        let (dispatched,): (bool,) = sqlx::query_as(
            "SELECT NOT EXISTS (SELECT 1 FROM dispatch_outbox
                                WHERE $1 = ANY(job_ids) AND published_at IS NULL)",
        )
        .bind(job_id)
        .fetch_one(&stack.db.pool)
        .await?;
        if dispatched {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "job never dispatched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (conn, ch) = stack.amqp_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for _ in 0..2 {
        let confirm = ch
            .basic_publish(
                "".into(),
                stack.queue.as_str().into(),
                BasicPublishOptions::default(),
                &JobMessage::single(job_id),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_priority(5),
            )
            .await?
            .await?;
        assert!(confirm.is_ack());
    }
    assert_eq!(
        pinq_core::amqp::queue_depth(&ch, &stack.queue).await?,
        3,
        "three deliveries of one job wait"
    );

    stack.start_worker()?;
    stack.start_worker()?;
    let done = stack.wait_done(batch, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["succeeded"], 1, "{done}");

    // Every copy was consumed (and acknowledged), yet the job ran once.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pinq_core::amqp::queue_depth(&ch, &stack.queue).await? > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "duplicates were not consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (attempt,): (i32,) = sqlx::query_as("SELECT attempt FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(attempt, 1, "the job was claimed once");
    let attempts = pinq_core::db::job_attempts(&stack.db.pool, job_id).await?;
    let outcomes: Vec<(i32, Option<String>)> = attempts
        .into_iter()
        .map(|a| (a.attempt, a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![(1, Some("succeeded".to_owned()))],
        "one attempt, a success"
    );
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_message_was_lost_in_the_broker_is_published_again() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.env = vec![("PINQ_REDISPATCH_AFTER_SECS".into(), "3".into())];
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_scheduler()?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(3)).await?;
    let batch = stack
        .submit_ok(&json!({"ops": pin_ops(&cids, "pin")}))
        .await?;
    // Published and confirmed: nothing is owed any more.
    wait_nothing_owed(&stack, Duration::from_secs(30)).await?;
    // An operator purges the queue: the messages are gone, the jobs still queued.
    let (conn, ch) = stack.amqp_channel().await?;
    let purged = ch
        .queue_purge(stack.queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    assert!(purged >= 1, "the batch's message was in the queue");
    let _ = conn.close(200, "bye".into()).await;
    let purged_at = std::time::Instant::now();

    stack.start_worker()?;
    let done = stack.wait_done(batch, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["succeeded"], 3, "{done}");
    let took = purged_at.elapsed();
    println!(
        "republished and done {} ms after the purge",
        took.as_millis()
    );
    assert!(
        took >= Duration::from_secs(2),
        "nothing could run before the relay published the jobs again ({took:?})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_jobs_cannot_name_a_missing_backend() -> anyhow::Result<()> {
    // `jobs` has no foreign key on `backends`; every writer of jobs locks the backends it
    // names through this function instead, which fails like the foreign key did.
    let mut stack = Stack::new().await?;
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    let (local,): (Uuid,) = sqlx::query_as("SELECT id FROM backends WHERE name = 'local'")
        .fetch_one(&stack.db.pool)
        .await?;
    sqlx::query("SELECT pinq_lock_backends($1)")
        .bind(vec![local, local])
        .execute(&stack.db.pool)
        .await?;
    let err = sqlx::query("SELECT pinq_lock_backends($1)")
        .bind(vec![local, Uuid::now_v7()])
        .execute(&stack.db.pool)
        .await
        .expect_err("a missing backend is refused");
    assert_eq!(pinq_e2e::sqlstate(&err).as_deref(), Some("23503"), "{err}");

    // While a batch's transaction holds the lock, the backend cannot be deleted; once it
    // committed, the deletion sees the new job and refuses.
    let mut tx = stack.db.pool.begin().await?;
    sqlx::query("SELECT pinq_lock_backends($1)")
        .bind(vec![local])
        .execute(&mut *tx)
        .await?;
    let delete = {
        let (http, url) = (stack.http.clone(), stack.api_url.clone());
        tokio::spawn(async move {
            http.delete(format!("{url}/v1/backends/local"))
                .bearer_auth(pinq_e2e::TOKEN)
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!delete.is_finished(), "the deletion waits for the lock");
    let batch = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO batches (id, owner, priority, backends, retry, job_count)
         VALUES ($1, 'admin', 5, '{local}', '{}', 1)",
    )
    .bind(batch)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO jobs (id, batch_id, seq, owner, backend_id, op, cid, cid_key, priority,
                           max_attempts, backoff_base_ms, backoff_factor, backoff_max_ms)
         VALUES ($1, $2, 0, 'admin', $3, 'pin', 'bafkqaaa', 'bafkqaaa', 5, 1, 100, 2, 1000)",
    )
    .bind(Uuid::now_v7())
    .bind(batch)
    .bind(local)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let resp = delete.await??;
    assert_eq!(resp.status(), 409, "a backend with a queued job is kept");
    let (still,): (i64,) = sqlx::query_as("SELECT count(*) FROM backends WHERE id = $1")
        .bind(local)
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(still, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_queued_until_a_worker_starts() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_scheduler()?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(20)).await?;
    let id = stack
        .submit_ok(&json!({"ops": pin_ops(&cids, "pin")}))
        .await?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = stack.batch(id).await?;
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(
        b["counts"]["queued"], 20,
        "with no worker every job waits queued: {b}"
    );
    assert!(stack.ipfs().pins().await?.is_empty());

    stack.start_worker()?;
    let done = stack.wait_done(id, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["succeeded"], 20, "{done}");
    assert_eq!(stack.ipfs().pins().await?, canonical(&cids));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_submitted_while_the_broker_is_unreachable_finishes_when_it_returns()
-> anyhow::Result<()> {
    let proxy = FaultProxy::start("127.0.0.1:5672").await?;
    let mut stack = Stack::new().await?;
    stack.amqp_url = proxy.amqp_url();
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(30)).await?;

    proxy.cut();
    let resp = stack
        .http
        .get(format!("{}/readyz", stack.api_url))
        .send()
        .await?;
    assert_eq!(
        resp.status(),
        503,
        "not ready while the broker is unreachable"
    );
    assert_eq!(
        resp.json::<Value>().await?["checks"]["rabbitmq"],
        "unreachable"
    );

    let id = stack
        .submit_ok(&json!({"ops": pin_ops(&cids, "pin")}))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = stack.batch(id).await?;
    assert_eq!(b["counts"]["queued"], 30, "accepted and waiting: {b}");
    let (undispatched,): (i64,) = sqlx::query_as(
        "SELECT count(DISTINCT j) FROM dispatch_outbox o, unnest(o.job_ids) AS j
                        WHERE o.published_at IS NULL",
    )
    .fetch_one(&stack.db.pool)
    .await?;
    assert_eq!(
        undispatched, 30,
        "no message could be published: all still owed"
    );

    proxy.restore();
    let done = stack.wait_done(id, Duration::from_secs(90)).await?;
    assert_eq!(done["counts"]["succeeded"], 30, "{done}");
    assert_eq!(stack.ipfs().pins().await?, canonical(&cids));
    let resp = stack
        .http
        .get(format!("{}/readyz", stack.api_url))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    Ok(())
}

/// Waits until every dispatch-outbox entry has been published and confirmed.
async fn wait_nothing_owed(stack: &Stack, within: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (owed,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM dispatch_outbox WHERE published_at IS NULL")
                .fetch_one(&stack.db.pool)
                .await?;
        if owed == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{owed} outbox entries still owed after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// While the broker takes connections but never answers, each of the API's background
/// publishes waits out its connect timeout in turn: the API starts no more than a bounded
/// number of them and leaves the rest to the relay, so its memory does not grow with every
/// batch accepted meanwhile. Once the broker answers again every job is dispatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_bounds_its_publishes_while_the_broker_stalls() -> anyhow::Result<()> {
    const BATCHES: usize = 80;
    let proxy = FaultProxy::start("127.0.0.1:5672").await?;
    let mut stack = Stack::new().await?;
    stack.amqp_url = proxy.amqp_url();
    stack.start_api().await?;
    stack.register_backend("b", "http://127.0.0.1:9").await?;

    proxy.stall();
    for _ in 0..BATCHES {
        stack
            .submit_ok(&json!({"ops": [{"op": "pin", "cid": random_cid()}]}))
            .await?;
    }
    let log = std::fs::read_to_string(&stack.api.as_ref().expect("the API runs").log)?;
    let skipped = log.matches("too many publishes under way").count();
    // 64 at most under way (a few may have timed out and made room meanwhile).
    assert!(
        skipped >= BATCHES - 64 - 6,
        "the API left publishes beyond its bound to the relay ({skipped} of {BATCHES})"
    );

    // The broker answers again; the relay publishes what the API left.
    proxy.restore();
    stack.start_scheduler()?;
    wait_nothing_owed(&stack, Duration::from_secs(90)).await?;
    let (published,): (i64,) =
        sqlx::query_as("SELECT count(DISTINCT j) FROM dispatch_outbox o, unnest(o.job_ids) AS j")
            .fetch_one(&stack.db.pool)
            .await?;
    assert_eq!(
        published, BATCHES as i64,
        "every job's message was confirmed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_attempts_are_readable() -> anyhow::Result<()> {
    let stack = Stack::full(1).await?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(3)).await?;
    let id = stack
        .submit_ok(&json!({"ops": pin_ops(&cids, "pin")}))
        .await?;
    stack.wait_done(id, Duration::from_secs(60)).await?;

    let page: Value = stack
        .req(
            reqwest::Method::GET,
            &format!("/v1/batches/{id}/jobs?limit=2"),
        )
        .send()
        .await?
        .json()
        .await?;
    let jobs = page["jobs"].as_array().expect("jobs array");
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["cid"], cids[0].as_str());
    let next = page["next"].as_str().expect("a next cursor");
    let page2: Value = stack
        .req(
            reqwest::Method::GET,
            &format!("/v1/batches/{id}/jobs?limit=2&after={next}"),
        )
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(page2["jobs"].as_array().map(Vec::len), Some(1));
    assert_eq!(page2["jobs"][0]["cid"], cids[2].as_str());

    let job_id = jobs[0]["id"].as_str().expect("id");
    let job: Value = stack
        .req(reqwest::Method::GET, &format!("/v1/jobs/{job_id}"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["backend"], "local");
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    assert_eq!(job["attempts"][0]["attempt"], 1);
    assert_eq!(job["attempts"][0]["outcome"], "succeeded");
    let (worker,): (Uuid,) = sqlx::query_as("SELECT id FROM workers")
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(job["attempts"][0]["worker_id"], worker.to_string(), "{job}");
    assert_eq!(
        job["attempts"][0]["finished_at"], job["finished_at"],
        "the success is the job's own record: {job}"
    );

    let missing = stack
        .req(
            reqwest::Method::GET,
            &format!("/v1/jobs/{}", Uuid::new_v4()),
        )
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    Ok(())
}
