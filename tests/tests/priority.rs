//! A higher priority overtakes the work a busy worker already holds. The broker reorders
//! only the messages it has not delivered yet, so the urgent priorities travel on a queue
//! of their own that every worker consumes with a prefetch window of its own
//! (`PINQ_URGENT_PRIORITY`); among the messages a worker holds, its free slots go to the
//! highest priority first (worker/src/slots.rs), and so do its backend calls among the jobs
//! it claimed (worker/src/calls.rs).
//!
//! The overtaking test's backend is the Kubo double (`pinq_e2e::kubo_double`, a TEST DOUBLE
//! of the Kubo RPC, used here for latency injection only): a worker stays busy for a known
//! time only with pins that take a known time, which a local node does not give. The
//! routing test uses a real node.

use std::time::Duration;

use pinq_e2e::kubo_double::{DoubleConfig, KuboDouble, Latency, synthetic_cid};
use pinq_e2e::{Stack, unique_contents};
use serde_json::{Value, json};

/// Messages of `PINQ_URGENT_PRIORITY` (default 8) and above go to the urgent queue, the rest
/// to the job queue; a worker consumes both. `GET /v1/stats` counts the messages waiting
/// in both, and the urgent queue's apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_priorities_travel_on_a_queue_of_their_own() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_scheduler()?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(8)).await?;
    // No worker yet: every message stays in its queue. One batch (one message) for each
    // priority around the threshold.
    let mut batches = Vec::new();
    for (priority, pair) in [1, 7, 8, 9].into_iter().zip(cids.chunks(2)) {
        let ops: Vec<Value> = pair
            .iter()
            .map(|c| json!({"op": "pin", "cid": c}))
            .collect();
        batches.push(
            stack
                .submit_ok(&json!({"priority": priority, "ops": ops}))
                .await?,
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let queue = loop {
        let stats: Value = stack
            .req(reqwest::Method::GET, "/v1/stats")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let queue = stats["queue"].clone();
        if queue["depth"] == 4 {
            break queue;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "four messages never reached the broker: {queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(queue["name"], stack.queue.as_str(), "{queue}");
    assert_eq!(
        queue["urgent"]["name"],
        format!("{}.urgent", stack.queue),
        "{queue}"
    );
    assert_eq!(
        queue["urgent"]["depth"], 2,
        "priorities 8 and 9 wait on the urgent queue, 1 and 7 on the job queue: {queue}"
    );
    let (_conn, ch) = stack.amqp_channel().await?;
    assert_eq!(pinq_core::amqp::queue_depth(&ch, &stack.queue).await?, 2);

    stack.start_worker()?;
    for id in batches {
        let done = stack.wait_done(id, Duration::from_secs(60)).await?;
        assert_eq!(done["counts"]["succeeded"], 2, "{done}");
    }
    assert_eq!(stack.ipfs().pins().await?.len(), 8);
    // Both queues were consumed and acknowledged.
    for q in [stack.queue.clone(), format!("{}.urgent", stack.queue)] {
        assert_eq!(pinq_core::amqp::queue_depth(&ch, &q).await?, 0, "{q}");
    }
    Ok(())
}

fn pins(salt: u64, n: u64) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"op": "pin", "cid": synthetic_cid(salt, i)}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_9_batch_overtakes_the_messages_a_busy_worker_holds() -> anyhow::Result<()> {
    // Concurrency 8, messages of 1,000 jobs and a prefetch of 2: the worker holds both
    // messages of the backlog and claims their jobs 4 at a time while each pin takes
    // 40 ms, so the oldest is acknowledged only after about 5 s.
    let mut stack = Stack::new().await?;
    for (k, v) in [
        ("PINQ_WORKER_CONCURRENCY", "8"),
        ("PINQ_MESSAGE_JOBS", "1000"),
        ("PINQ_WORKER_PREFETCH", "2"),
        ("PINQ_PIN_GROUP", "1"),
    ] {
        stack.env.push((k.into(), v.into()));
    }
    let double = KuboDouble::start(DoubleConfig {
        latency: Latency::Fixed(Duration::from_millis(40)),
        error_rate: 0.0,
    })
    .await?;
    stack.start_api().await?;
    stack.register_backend("double", &double.url).await?;
    stack.start_worker()?;
    stack.start_scheduler()?;

    let backlog = stack
        .submit_ok(&json!({"priority": 1, "ops": pins(1, 2000)}))
        .await?;
    // The worker is busy and holds its window of backlog messages.
    stack
        .wait_succeeded(backlog, 100, Duration::from_secs(60))
        .await?;
    let urgent = stack
        .submit_ok(&json!({"priority": 9, "ops": pins(2, 16)}))
        .await?;
    let done = stack.wait_done(urgent, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["succeeded"], 16, "{done}");

    // Backlog jobs that started after the urgent batch was committed and before its last
    // job started. The urgent batch (priority 9, at least the default PINQ_URGENT_PRIORITY of
    // 8) travels on the urgent queue, whose window is free, so the worker has its message
    // at once; it takes the first slot that comes free and every slot after it. What
    // starts meanwhile is the backlog's claims while the urgent batch is being published
    // and its first job claimed (4 jobs each; 0-8 in all here). On the job queue, the
    // urgent message would wait until the worker acknowledged the oldest message it holds:
    // about 875 backlog jobs first (measured with PINQ_URGENT_PRIORITY=10).
    let (overtaken_by,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs b
         WHERE b.batch_id = $1
           AND b.started_at > (SELECT created_at FROM batches WHERE id = $2)
           AND b.started_at < (SELECT max(started_at) FROM jobs WHERE batch_id = $2)",
    )
    .bind(backlog)
    .bind(urgent)
    .fetch_one(&stack.db.pool)
    .await?;
    let (backlog_left,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE batch_id = $1 AND state = 'queued'")
            .bind(backlog)
            .fetch_one(&stack.db.pool)
            .await?;
    println!(
        "priority_overtakes: backlog jobs started between the urgent batch's commit and its \
         last start: {overtaken_by}; backlog still queued: {backlog_left}"
    );
    assert!(
        backlog_left > 500,
        "the backlog must still be there when the urgent batch is done ({backlog_left} left)"
    );
    assert!(
        overtaken_by <= 48,
        "{overtaken_by} backlog jobs started first: the urgent batch waited behind messages \
         the worker held"
    );
    Ok(())
}
