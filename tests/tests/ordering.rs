//! Operations on one CID and backend run one at a time, in the order they were submitted,
//! however many workers share the queue: against a real IPFS node, the node and the pin
//! index end as the last operation on each CID says, also when the relay gives parked jobs
//! back a few at a time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pinq_core::cid::canonical_of;
use pinq_e2e::{Stack, unique_contents};
use serde_json::{Value, json};

/// A job that succeeded: its keys, its attempt count and when its attempt ran.
type Ran = (String, Option<String>, i32, DateTime<Utc>, DateTime<Utc>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_then_unpin_then_pin_of_one_cid_ends_as_the_last_one_says() -> anyhow::Result<()> {
    pin_unpin_pin(&Stack::full(2).await?).await?;
    Ok(())
}

/// The same with the relay's batch at 4, so that its unblocked scan gives the parked jobs
/// (all 105 of the second batch, in practice) back a page of 4 at a time, over many
/// passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_ends_right_when_the_relay_pages_through_parked_jobs() -> anyhow::Result<()> {
    let stack = Stack::full_with_env(2, &[("PINQ_RELAY_BATCH", "4")]).await?;
    let most_parked = pin_unpin_pin(&stack).await?;
    println!("most jobs parked at once: {most_parked}");
    assert!(
        most_parked > 4,
        "more than one page of jobs was parked at once (most seen: {most_parked})"
    );
    Ok(())
}

/// Pins 45 CIDs, then at once runs pin/unpin sequences on them; checks the node, the pin
/// index and the order in which each CID's jobs ran. Returns the most jobs seen parked at
/// once.
async fn pin_unpin_pin(stack: &Stack) -> anyhow::Result<i64> {
    let ipfs = stack.ipfs();
    let cids = ipfs.add_unpinned(&unique_contents(60)).await?;
    let (cids, targets) = cids.split_at(45);

    let first: Vec<Value> = cids
        .iter()
        .map(|c| json!({"op": "pin", "cid": c}))
        .collect();
    // Submitted as soon as the first is accepted, its operations on one CID side by side
    // (so one message carries them to one worker at once), some spelled as CIDv1.
    let mut second = Vec::new();
    let mut expected = HashSet::new();
    for (i, c) in cids.iter().enumerate() {
        let v1 = canonical_of(c).expect("the node returns valid CIDs");
        match i % 3 {
            0 => {
                second.push(json!({"op": "unpin", "cid": c}));
                second.push(json!({"op": "pin", "cid": v1}));
                expected.insert(v1);
            }
            1 => {
                second.push(json!({"op": "unpin", "cid": v1}));
                second.push(json!({"op": "pin", "cid": c}));
                second.push(json!({"op": "unpin", "cid": c}));
            }
            _ => {
                let target = &targets[i / 3];
                second.push(json!({"op": "replace", "cid": target, "replaces": c}));
                second.push(json!({"op": "pin", "cid": c}));
                expected.insert(v1);
                expected.insert(canonical_of(target).expect("valid CID"));
            }
        }
    }
    // How many jobs wait parked at once, watched while the batches run.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch = tokio::spawn({
        let (pool, watching) = (stack.db.pool.clone(), watching.clone());
        async move {
            let mut most = 0i64;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let (n,): (i64,) =
                    sqlx::query_as("SELECT count(*) FROM jobs WHERE blocked_by IS NOT NULL")
                        .fetch_one(&pool)
                        .await?;
                most = most.max(n);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(most)
        }
    });
    let a = stack
        .submit_ok(&json!({"backends": ["local"], "ops": first}))
        .await?;
    let b = stack
        .submit_ok(&json!({"backends": ["local"], "ops": second}))
        .await?;
    for (id, n) in [(a, 45), (b, 105)] {
        let done = stack.wait_done(id, Duration::from_secs(120)).await?;
        assert_eq!(done["counts"]["succeeded"], n, "{done}");
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let most_parked = watch.await??;

    assert_eq!(
        ipfs.pins().await?,
        expected,
        "the node holds what each CID's last operation says"
    );
    assert_eq!(
        stack.pin_index("local").await?,
        expected,
        "the pin index agrees with the node"
    );

    // Each key's jobs ran one after another, in submission order, once each.
    let rows: Vec<Ran> = sqlx::query_as(
        "SELECT j.cid_key, j.replaces_key, j.attempt, j.started_at, j.finished_at
         FROM jobs j WHERE j.state = 'succeeded' AND j.succeeded_by IS NOT NULL
         ORDER BY j.submit_seq",
    )
    .fetch_all(&stack.db.pool)
    .await?;
    assert_eq!(rows.len(), 150);
    let mut last_end: HashMap<String, DateTime<Utc>> = HashMap::new();
    for (key, replaces, attempt, started, finished) in rows {
        assert_eq!(attempt, 1, "no job on {key} ran twice");
        for k in std::iter::once(key).chain(replaces) {
            if let Some(end) = last_end.get(&k) {
                assert!(
                    started >= *end,
                    "a job on {k} started at {started} before the one submitted before it ended at {end}"
                );
            }
            last_end.insert(k, finished);
        }
    }
    stack.db.check_tallies().await?;
    Ok(most_parked)
}
