//! Fault tests: processes are really killed and services really restarted, mid-batch.
//! Each prints a `fault-figures` line (submitted / succeeded / failed / lost / double-run)
//! that docs/reliability.md records. A test that restarts PostgreSQL or RabbitMQ runs its
//! own private instance, so the shared services other tests use are never disturbed.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pinq_core::retry::RetryPolicy;
use pinq_e2e::private::{PrivatePostgres, PrivateRabbit};
use pinq_e2e::{Stack, unique_contents};
use rand::Rng;
use serde_json::{Value, json};
use uuid::Uuid;

fn pins(cids: &[String]) -> Vec<Value> {
    cids.iter()
        .map(|c| json!({"op": "pin", "cid": c}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_workers_mid_batch_loses_nothing_and_runs_nothing_twice() -> anyhow::Result<()> {
    const LEASE_SECS: u64 = 5;
    let mut stack = Stack::new().await?;
    stack
        .env
        .push(("PINQ_LEASE_SECS".into(), LEASE_SECS.to_string()));
    stack
        .env
        .push(("PINQ_WORKER_CONCURRENCY".into(), "16".into()));
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_worker()?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(2000)).await?;
    let batch = stack.submit_ok(&json!({"ops": pins(&cids)})).await?;

    let mut rng = rand::rng();
    let mut max_recovery = Duration::ZERO;
    let mut orphaned_total = 0;
    for round in 0..3 {
        // A random moment while the batch is under way.
        stack
            .wait_succeeded(batch, 50 + round * 300, Duration::from_secs(120))
            .await?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        let victim = rng.random_range(0..stack.workers.len());
        let worker_id = stack.worker_id(victim).await?;
        stack.workers[victim].kill9();
        let killed_at = Instant::now();
        let orphaned: Vec<(Uuid,)> =
            sqlx::query_as("SELECT id FROM jobs WHERE state = 'running' AND lease_owner = $1")
                .bind(worker_id)
                .fetch_all(&stack.db.pool)
                .await?;
        orphaned_total += orphaned.len();
        stack.workers.remove(victim);
        stack.start_worker()?;

        // Every job the dead worker held must end within lease + 30 s.
        let ids: Vec<Uuid> = orphaned.into_iter().map(|(id,)| id).collect();
        loop {
            let (open,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state <> 'succeeded'",
            )
            .bind(&ids)
            .fetch_one(&stack.db.pool)
            .await?;
            if open == 0 {
                break;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(LEASE_SECS + 30),
                "jobs of the killed worker not recovered within lease + 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        max_recovery = max_recovery.max(killed_at.elapsed());
    }
    let done = stack.wait_done(batch, Duration::from_secs(240)).await?;
    let f = stack.figures(&[batch], 2000).await?;
    f.print(
        "kill_9_worker_x3",
        &format!(
            "orphaned={orphaned_total} max_recovery_ms={}",
            max_recovery.as_millis()
        ),
    );
    assert_eq!(done["counts"]["succeeded"], 2000, "{done}");
    assert_eq!((f.succeeded, f.lost, f.double_run), (2000, 0, 0));
    assert_eq!(stack.ipfs().pins().await?.len(), 2000);
    stack.db.check_tallies().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restart_mid_batch_is_survived_without_restarting_processes() -> anyhow::Result<()>
{
    let mut rabbit = PrivateRabbit::start().await?;
    let mut stack = Stack::new().await?;
    stack.amqp_url = rabbit.amqp_url();
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_worker()?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    let pids: Vec<i32> = stack.workers.iter().map(|w| w.pid()).collect();
    let cids = stack.ipfs().add_unpinned(&unique_contents(1000)).await?;
    let first = stack.submit_ok(&json!({"ops": pins(&cids[..600])})).await?;
    stack
        .wait_succeeded(first, 100, Duration::from_secs(60))
        .await?;

    rabbit.stop().await?;
    // Submitted during the outage: accepted, dispatched by the relay afterwards.
    let second = stack.submit_ok(&json!({"ops": pins(&cids[600..])})).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.start_again().await?;

    stack.wait_done(first, Duration::from_secs(180)).await?;
    stack.wait_done(second, Duration::from_secs(180)).await?;
    let f = stack.figures(&[first, second], 1000).await?;
    f.print("rabbitmq_restart", "");
    assert_eq!((f.succeeded, f.lost, f.double_run), (1000, 0, 0));
    for (w, pid) in stack.workers.iter_mut().zip(pids) {
        assert_eq!(w.pid(), pid);
        assert!(w.alive(), "worker {pid} survived the broker restart");
    }
    assert!(stack.api.as_mut().is_some_and(|a| a.alive()));
    assert!(stack.scheduler.as_mut().is_some_and(|s| s.alive()));
    assert_eq!(stack.ipfs().pins().await?.len(), 1000);
    stack.db.check_tallies().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_batch_answers_503_and_loses_nothing() -> anyhow::Result<()> {
    let mut pg = PrivatePostgres::start().await?;
    let server = format!("postgres://postgres@127.0.0.1:{}", pg.port());
    let mut stack = Stack::on_postgres(&server).await?;
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_worker()?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(1000)).await?;
    let batch = stack.submit_ok(&json!({"ops": pins(&cids)})).await?;
    stack
        .wait_succeeded(batch, 100, Duration::from_secs(60))
        .await?;

    pg.stop().await?;
    // Ask the API during the outage: it must say 503 with Retry-After, never 500.
    let mut statuses = Vec::new();
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(4) {
        let resp = stack
            .req(reqwest::Method::GET, &format!("/v1/batches/{batch}"))
            .send()
            .await?;
        let status = resp.status().as_u16();
        if status == 503 {
            assert!(resp.headers().contains_key("retry-after"));
            let body: Value = resp.json().await?;
            assert_eq!(body["error"]["code"], "unavailable", "{body}");
        }
        statuses.push(status);
    }
    let submit_during_outage = stack
        .req(reqwest::Method::POST, "/v1/batches")
        .json(&json!({"ops": pins(&cids[..1])}))
        .send()
        .await?
        .status()
        .as_u16();
    pg.start_again().await?;

    let done = stack.wait_done(batch, Duration::from_secs(180)).await?;
    let f = stack.figures(&[batch], 1000).await?;
    let n503 = statuses.iter().filter(|s| **s == 503).count();
    let n500 = statuses.iter().filter(|s| **s >= 500 && **s != 503).count();
    f.print(
        "postgres_restart",
        &format!("api_503={n503} api_other_5xx={n500} submit_during_outage={submit_during_outage}"),
    );
    assert!(
        n503 > 0,
        "the API answered 503 during the outage: {statuses:?}"
    );
    assert_eq!(n500, 0, "never another 5xx: {statuses:?}");
    assert_eq!(
        submit_during_outage, 503,
        "a submit is refused with 503, not lost"
    );
    assert_eq!(done["counts"]["succeeded"], 1000, "{done}");
    assert_eq!((f.lost, f.double_run), (0, 0));
    for w in stack.workers.iter_mut() {
        assert!(w.alive(), "workers survive a database restart");
    }
    stack.db.check_tallies().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipfs_node_down_mid_batch_then_back_finishes_everything() -> anyhow::Result<()> {
    let mut stack = Stack::full_with_env(1, &[("PINQ_PIN_TIMEOUT_SECS", "5")]).await?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(600)).await?;
    let retry = json!({"max_attempts": 10, "base_ms": 200, "factor": 2.0, "max_delay_ms": 3000});
    let batch = stack
        .submit_ok(&json!({"ops": pins(&cids), "retry": retry}))
        .await?;
    stack
        .wait_succeeded(batch, 100, Duration::from_secs(60))
        .await?;

    if let Some(node) = stack.ipfs.as_mut() {
        node.stop().await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    if let Some(node) = stack.ipfs.as_mut() {
        node.restart().await?;
    }

    let done = stack.wait_done(batch, Duration::from_secs(180)).await?;
    let f = stack.figures(&[batch], 600).await?;
    f.print("ipfs_node_down_4s", "");
    assert_eq!(done["counts"]["succeeded"], 600, "{done}");
    assert_eq!((f.lost, f.double_run), (0, 0));
    // A refused connection spends no attempt; only pins cut off mid-request count, so
    // no job comes near the batch's budget of 10.
    assert!(f.max_attempt <= 3, "max attempt {}", f.max_attempt);
    assert_eq!(stack.ipfs().pins().await?.len(), 600);
    stack.db.check_tallies().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprovided_cid_backs_off_then_fails_and_can_be_redriven() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.env.push(("PINQ_PIN_TIMEOUT_SECS".into(), "1".into()));
    stack
        .env
        .push(("PINQ_RELAY_INTERVAL_MS".into(), "50".into()));
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    let cid = stack.ipfs().unprovided_cid();
    let policy = RetryPolicy {
        max_attempts: 4,
        base: Duration::from_millis(1000),
        factor: 2.0,
        max_delay: Duration::from_millis(8000),
    };
    let batch = stack
        .submit_ok(&json!({
            "ops": [{"op": "pin", "cid": cid}],
            "retry": {"max_attempts": 4, "base_ms": 1000, "factor": 2.0, "max_delay_ms": 8000}
        }))
        .await?;
    // The submit returns at once even though nobody can provide the CID.
    let done = stack.wait_done(batch, Duration::from_secs(90)).await?;
    assert_eq!(done["counts"]["failed"], 1, "{done}");

    let (job_id, last_error): (Uuid, String) =
        sqlx::query_as("SELECT id, last_error FROM jobs WHERE batch_id = $1")
            .bind(batch)
            .fetch_one(&stack.db.pool)
            .await?;
    assert!(last_error.contains("timed out"), "{last_error}");
    assert!(
        last_error.contains("gave up after 4 attempts"),
        "{last_error}"
    );
    type Attempt = (
        i32,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        String,
    );
    let attempts: Vec<Attempt> = sqlx::query_as(
        "SELECT attempt, started_at, finished_at, outcome FROM job_attempts
         WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(job_id)
    .fetch_all(&stack.db.pool)
    .await?;
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.3.as_str()).collect();
    assert_eq!(outcomes, ["retry", "retry", "retry", "failed"]);
    // The wait between one attempt's end and the next one's start is the backoff: never
    // more than that attempt's ceiling (plus the relay's pass and dispatch time).
    let mut waits = Vec::new();
    for pair in attempts.windows(2) {
        let n = pair[0].0 as u32;
        let wait = (pair[1].1 - pair[0].2).to_std().unwrap_or_default();
        let ceiling = policy.ceiling(n);
        assert!(
            wait <= ceiling + Duration::from_millis(1500),
            "wait after attempt {n} was {wait:?}, ceiling {ceiling:?}"
        );
        waits.push(format!(
            "{}ms (ceiling {}ms)",
            wait.as_millis(),
            ceiling.as_millis()
        ));
    }
    println!(
        "fault-figures unprovided_cid: attempts=4 waits=[{}] error={last_error:?}",
        waits.join(", ")
    );

    // Re-drive: the job runs again, with a fresh budget of attempts.
    let resp = stack
        .req(
            reqwest::Method::POST,
            &format!("/v1/batches/{batch}/retry-failed"),
        )
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.json::<Value>().await?["requeued"], 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (attempt, state): (i32, String) =
            sqlx::query_as("SELECT attempt, state FROM jobs WHERE id = $1")
                .bind(job_id)
                .fetch_one(&stack.db.pool)
                .await?;
        if attempt >= 5 {
            assert_ne!(state, "failed", "a re-driven job gets a fresh budget");
            break;
        }
        assert!(Instant::now() < deadline, "re-driven job never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And it can be cancelled while it waits or runs.
    let resp = stack
        .req(reqwest::Method::POST, &format!("/v1/jobs/{job_id}/cancel"))
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    let done = stack.wait_done(batch, Duration::from_secs(30)).await?;
    assert_eq!(done["counts"]["cancelled"], 1, "{done}");
    stack.db.check_tallies().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_loaded_worker_within_its_grace_and_strands_no_job() -> anyhow::Result<()> {
    const GRACE_SECS: u64 = 6;
    let mut stack = Stack::new().await?;
    stack
        .env
        .push(("PINQ_SHUTDOWN_GRACE_SECS".into(), GRACE_SECS.to_string()));
    // A grace period longer than the time after which a silent worker is taken for lost:
    // the draining worker keeps its heartbeat, so its running jobs stay its own.
    stack.env.push(("PINQ_HEARTBEAT_SECS".into(), "1".into()));
    stack
        .env
        .push(("PINQ_WORKER_STALE_SECS".into(), "3".into()));
    stack
        .env
        .push(("PINQ_PIN_TIMEOUT_SECS".into(), "30".into()));
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(1000)).await?;
    // Five pins nobody can serve: still running when the grace period ends.
    let mut stuck = Vec::new();
    for _ in 0..5 {
        stuck.push(stack.ipfs().unprovided_cid());
    }
    let stuck_batch = stack
        .submit_ok(&json!({"priority": 9, "ops": pins(&stuck), "retry": {"max_attempts": 1}}))
        .await?;
    let batch = stack.submit_ok(&json!({"ops": pins(&cids)})).await?;
    stack
        .wait_succeeded(batch, 100, Duration::from_secs(60))
        .await?;

    let worker_id = stack.worker_id(0).await?;
    let stopped_at = Instant::now();
    stack.workers[0].signal(Signal::SIGTERM);
    let status = stack.workers[0]
        .wait(Duration::from_secs(GRACE_SECS + 15))
        .await;
    let took = stopped_at.elapsed();
    let status = status.expect("the worker exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(GRACE_SECS + 10), "took {took:?}");

    let (stranded,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE state = 'running' AND lease_owner = $1")
            .bind(worker_id)
            .fetch_one(&stack.db.pool)
            .await?;
    assert_eq!(
        stranded, 0,
        "no job is left running under the stopped worker"
    );
    let (released,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM job_attempts WHERE worker_id = $1 AND outcome = 'lost'
         AND error = 'worker shut down before the job finished'",
    )
    .bind(worker_id)
    .fetch_one(&stack.db.pool)
    .await?;
    let (state,): (String,) = sqlx::query_as("SELECT state FROM workers WHERE id = $1")
        .bind(worker_id)
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(state, "stopped");
    // The five stuck pins were running when the grace period ended: handed back by the
    // worker itself, not abandoned, nor taken from it for lost while it drained. (They also prove slow pins do not stop a worker claiming other work: the
    // batch progressed beside them.)
    assert_eq!(released, 5, "the stuck pins were handed back");

    // A new worker finishes the rest: the handed-back stuck pins time out and fail
    // (one attempt each, as their batch asked), everything else succeeds.
    stack.env.push(("PINQ_PIN_TIMEOUT_SECS".into(), "1".into()));
    stack.start_worker()?;
    stack.wait_done(batch, Duration::from_secs(120)).await?;
    stack
        .wait_done(stuck_batch, Duration::from_secs(60))
        .await?;
    let f = stack.figures(&[batch], 1000).await?;
    f.print(
        "sigterm_worker",
        &format!("exit_ms={} handed_back={released}", took.as_millis()),
    );
    assert_eq!((f.succeeded, f.lost, f.double_run), (1000, 0, 0));
    let stuck_counts = stack.state_counts(stuck_batch).await?;
    assert_eq!(stuck_counts.get("failed"), Some(&5), "{stuck_counts:?}");
    stack.db.check_tallies().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_heartbeating_is_reaped_long_before_its_leases_expire()
-> anyhow::Result<()> {
    const LEASE_SECS: u64 = 120;
    const STALE_SECS: u64 = 4;
    let mut stack = Stack::new().await?;
    stack
        .env
        .push(("PINQ_LEASE_SECS".into(), LEASE_SECS.to_string()));
    stack
        .env
        .push(("PINQ_WORKER_STALE_SECS".into(), STALE_SECS.to_string()));
    stack.env.push(("PINQ_HEARTBEAT_SECS".into(), "1".into()));
    stack
        .env
        .push(("PINQ_PIN_TIMEOUT_SECS".into(), "60".into()));
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    // Pins nobody can serve: they are still running when the worker dies.
    let stuck: Vec<String> = (0..3).map(|_| stack.ipfs().unprovided_cid()).collect();
    let batch = stack
        .submit_ok(&json!({"ops": pins(&stuck), "retry": {"max_attempts": 2}}))
        .await?;
    let worker_id = stack.worker_id(0).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack
        .state_counts(batch)
        .await?
        .get("running")
        .copied()
        .unwrap_or(0)
        < 3
    {
        assert!(Instant::now() < deadline, "the pins never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stack.workers[0].kill9();
    let killed_at = Instant::now();
    // A second worker, whose pins time out at once, takes the jobs over.
    stack.env.push(("PINQ_PIN_TIMEOUT_SECS".into(), "1".into()));
    stack.start_worker()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (retaken,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE batch_id = $1 AND attempt >= 2")
                .bind(batch)
                .fetch_one(&stack.db.pool)
                .await?;
        if retaken == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs of the dead worker not taken back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retaken_after = killed_at.elapsed();
    let (state,): (String,) = sqlx::query_as("SELECT state FROM workers WHERE id = $1")
        .bind(worker_id)
        .fetch_one(&stack.db.pool)
        .await?;
    let lost: Vec<(String,)> = sqlx::query_as(
        "SELECT a.outcome FROM job_attempts a JOIN jobs j ON j.id = a.job_id
         WHERE j.batch_id = $1 AND a.attempt = 1",
    )
    .bind(batch)
    .fetch_all(&stack.db.pool)
    .await?;
    println!(
        "fault-figures worker_reaped: lease_secs={LEASE_SECS} stale_secs={STALE_SECS} retaken_after_ms={}",
        retaken_after.as_millis()
    );
    assert_eq!(state, "lost", "the silent worker is marked lost");
    assert!(
        lost.iter().all(|(o,)| o == "lost"),
        "first attempts closed as lost: {lost:?}"
    );
    assert!(
        retaken_after < Duration::from_secs(STALE_SECS + 15),
        "taken back after {retaken_after:?}, not after the {LEASE_SECS} s lease"
    );
    let done = stack.wait_done(batch, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["failed"], 3, "{done}");
    stack.db.check_tallies().await?;
    Ok(())
}
