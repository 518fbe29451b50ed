//! Pins that start together share one `pin/add` call (worker/src/pin_groups.rs), on a
//! real js-ipfs node. A recording proxy in front of the node (`CallLog`, a test
//! instrument: the node does the pinning) shows the calls the worker made.

use std::collections::HashSet;
use std::time::Duration;

use pinq_core::cid::canonical_of;
use pinq_e2e::{CallLog, Stack, unique_contents};
use serde_json::json;

/// A stack whose one backend, `logged`, is the node behind a [`CallLog`].
async fn stack_behind_log(env: &[(&str, &str)]) -> anyhow::Result<(Stack, CallLog)> {
    let mut stack = Stack::new().await?;
    for (k, v) in env {
        stack.env.push(((*k).into(), (*v).into()));
    }
    stack.start_ipfs().await?;
    let log = CallLog::start(&stack.ipfs().url).await?;
    stack.start_api().await?;
    stack.register_backend("logged", &log.url).await?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    Ok((stack, log))
}

fn canonical(cids: &[String]) -> HashSet<String> {
    cids.iter()
        .map(|c| canonical_of(c).expect("the node returned valid CIDs"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_that_start_together_share_a_call() -> anyhow::Result<()> {
    let (stack, log) =
        stack_behind_log(&[("PINQ_WORKER_CONCURRENCY", "16"), ("PINQ_PIN_GROUP", "8")]).await?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(96)).await?;
    let ops: Vec<_> = cids
        .iter()
        .map(|c| json!({"op": "pin", "cid": c}))
        .collect();
    let id = stack
        .submit_ok(&json!({"backends": ["logged"], "ops": ops}))
        .await?;
    let done = stack.wait_done(id, Duration::from_secs(120)).await?;
    assert_eq!(done["counts"]["succeeded"], 96, "{done}");
    assert_eq!(stack.ipfs().pins().await?, canonical(&cids));

    let calls = log.pin_adds();
    let named: HashSet<String> = calls
        .iter()
        .flatten()
        .map(|c| canonical_of(c).expect("pinq sends valid CIDs"))
        .collect();
    assert_eq!(named, canonical(&cids), "every CID went to the node");
    let largest = calls.iter().map(Vec::len).max().unwrap_or(0);
    assert!(
        largest > 1,
        "one claim's 8 or more jobs start together, so some call carries several CIDs: {calls:?}"
    );
    assert!(
        largest <= 8,
        "no call carries more than PINQ_PIN_GROUP CIDs"
    );
    assert!(
        calls.len() < 96,
        "fewer calls than pins ({} calls)",
        calls.len()
    );
    stack.db.check_tallies().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_call_that_fails_leaves_each_pin_its_own_call() -> anyhow::Result<()> {
    // The pin timeout is 2 s, so a shared call gives up after half a second.
    let (stack, log) = stack_behind_log(&[
        ("PINQ_WORKER_CONCURRENCY", "32"),
        ("PINQ_PIN_GROUP", "16"),
        ("PINQ_PIN_TIMEOUT_SECS", "2"),
    ])
    .await?;
    let held = stack.ipfs().add_unpinned(&unique_contents(29)).await?;
    // Content no node provides, among content the node holds.
    let missing: Vec<String> = (0..3).map(|_| stack.ipfs().unprovided_cid()).collect();
    let mut cids = held.clone();
    for (i, m) in missing.iter().enumerate() {
        cids.insert(5 + 10 * i, m.clone());
    }
    let ops: Vec<_> = cids
        .iter()
        .map(|c| json!({"op": "pin", "cid": c}))
        .collect();
    let id = stack
        .submit_ok(&json!({
            "backends": ["logged"],
            "ops": ops,
            "retry": {"max_attempts": 1}
        }))
        .await?;
    let done = stack.wait_done(id, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["succeeded"], 29, "{done}");
    assert_eq!(done["counts"]["failed"], 3, "{done}");
    assert_eq!(stack.ipfs().pins().await?, canonical(&held));

    // Each failure is the missing CID's own: its own call's timeout.
    let failed: Vec<(String, String)> =
        sqlx::query_as("SELECT cid, last_error FROM jobs WHERE batch_id = $1 AND state = 'failed'")
            .bind(id)
            .fetch_all(&stack.db.pool)
            .await?;
    let failed_cids: HashSet<String> = failed.iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(failed_cids, missing.iter().cloned().collect());
    for (cid, error) in &failed {
        assert!(error.contains("timed out"), "{cid}: {error}");
    }
    let once: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE batch_id = $1 AND attempt = 1")
            .bind(id)
            .fetch_one(&stack.db.pool)
            .await?;
    assert_eq!(
        once, 32,
        "every job ran once: a shared call spends no attempt"
    );

    // The jobs of one claim start together, so the worker tried shared calls first, and
    // gave each CID of a shared call that failed a call of its own.
    let calls = log.pin_adds();
    let failed_shared: Vec<&Vec<String>> = calls
        .iter()
        .filter(|c| c.len() > 1 && c.iter().any(|cid| missing.contains(cid)))
        .collect();
    assert!(
        !failed_shared.is_empty(),
        "no shared call named a missing CID: {calls:?}"
    );
    for shared in failed_shared {
        for cid in shared {
            assert!(
                calls.iter().any(|c| c.len() == 1 && &c[0] == cid),
                "{cid} of a failed shared call got no call of its own: {calls:?}"
            );
        }
    }
    stack.db.check_tallies().await?;
    Ok(())
}
