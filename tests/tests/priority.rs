//! A higher priority overtakes the work a busy worker already holds. The broker reorders
//! only the messages it has not delivered yet; among the messages a worker holds (up to
//! its prefetch), its free slots go to the highest priority first (worker/src/slots.rs).
//!
//! The backend is the Kubo double (`pinq_e2e::kubo_double`, a TEST DOUBLE of the Kubo RPC,
//! used here for latency injection only): a worker stays busy for a known time only with
//! pins that take a known time, which a local node does not give.

use std::time::Duration;

use pinq_e2e::Stack;
use pinq_e2e::kubo_double::{DoubleConfig, KuboDouble, Latency, synthetic_cid};
use serde_json::{Value, json};

fn pins(salt: u64, n: u64) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"op": "pin", "cid": synthetic_cid(salt, i)}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_9_batch_overtakes_the_messages_a_busy_worker_holds() -> anyhow::Result<()> {
    // Concurrency 8, messages of 16 and a prefetch of 8: the worker holds 8 messages, 128
    // jobs, and claims them 4 at a time while each pin takes 40 ms.
    let mut stack = Stack::new().await?;
    for (k, v) in [
        ("PINQ_WORKER_CONCURRENCY", "8"),
        ("PINQ_MESSAGE_JOBS", "16"),
        ("PINQ_WORKER_PREFETCH", "8"),
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
    // job started. The urgent message waits for a place in the window: the oldest message
    // held must be claimed whole (at most 16 jobs), or the next one too if the urgent
    // message reached the broker just after an acknowledgement. It is then served first,
    // except for what the backlog's next message claims while the urgent one runs a claim
    // statement (up to 4 jobs each time). Served in arrival order, it would also wait for
    // the seven other messages held: more than 100 jobs.
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
        overtaken_by <= 64,
        "{overtaken_by} backlog jobs started first: the urgent batch waited behind messages \
         the worker held"
    );
    Ok(())
}
