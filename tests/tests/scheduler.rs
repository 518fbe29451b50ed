//! The scheduler's cron schedules end to end: exactly-once firing across replicas,
//! catch-up after downtime, health checks against a real IPFS node that goes away and
//! comes back, and pin-index reconciliation with a node changed behind pinq's back.

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pinq_core::cid::canonical_of;
use pinq_e2e::{Proc, Stack, bin_path, unique_contents};
use serde_json::{Value, json};
use uuid::Uuid;

/// Starts one more scheduler process beside the stack's own (the harness holds one).
fn spawn_scheduler(stack: &Stack, label: &str) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin_path("pinq-scheduler"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &stack.db.url)
        .env("AMQP_URL", &stack.amqp_url)
        .env("PINQ_QUEUE", &stack.queue)
        .env("PINQ_RELAY_INTERVAL_MS", "200")
        .env("PINQ_RELAY_GRACE_MS", "1000")
        .env("PINQ_DB_MAX_CONNECTIONS", "8")
        .env("RUST_LOG", "info");
    for (k, v) in &stack.env {
        cmd.env(k, v);
    }
    Proc::spawn(label, cmd, &stack.dir)
}

async fn patch_schedule(stack: &Stack, name: &str, body: Value) -> anyhow::Result<Value> {
    let resp = stack
        .req(reqwest::Method::PATCH, &format!("/v1/schedules/{name}"))
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let v: Value = resp.json().await?;
    anyhow::ensure!(status == 200, "PATCH {name}: {status} {v}");
    Ok(v)
}

/// Makes `health-check` fire every second and turns the other built-ins off.
async fn only_health_check_every_second(stack: &Stack) -> anyhow::Result<()> {
    patch_schedule(
        stack,
        "health-check",
        json!({"cron": "* * * * * *", "enabled": true}),
    )
    .await?;
    patch_schedule(stack, "index-update", json!({"enabled": false})).await?;
    patch_schedule(stack, "prune", json!({"enabled": false})).await?;
    Ok(())
}

#[derive(Debug, sqlx::FromRow)]
struct RunRow {
    fire_time: DateTime<Utc>,
    status: String,
    started_at: Option<DateTime<Utc>>,
    runner: Option<uuid::Uuid>,
}

async fn cron_runs(stack: &Stack, schedule: &str) -> anyhow::Result<Vec<RunRow>> {
    Ok(sqlx::query_as(
        "SELECT fire_time, status, started_at, runner FROM schedule_runs
         WHERE schedule = $1 AND NOT manual ORDER BY fire_time",
    )
    .bind(schedule)
    .fetch_all(&stack.db.pool)
    .await?)
}

async fn db_now(stack: &Stack) -> anyhow::Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&stack.db.pool)
        .await?)
}

/// Asserts that consecutive fire times are exactly one second apart: no fire time was
/// lost (the unique key already rules out a second row for one fire time).
fn assert_every_second(runs: &[RunRow]) {
    for w in runs.windows(2) {
        assert_eq!(
            (w[1].fire_time - w[0].fire_time).num_milliseconds(),
            1000,
            "a gap or an off-grid fire time between {} and {}",
            w[0].fire_time,
            w[1].fire_time
        );
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs a schedule now through the admin API and waits for the run to end; returns its
/// status and output.
async fn run_now(stack: &Stack, schedule: &str) -> anyhow::Result<(String, Value)> {
    let resp = stack
        .req(
            reqwest::Method::POST,
            &format!("/v1/schedules/{schedule}/run"),
        )
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    let run: Value = resp.json().await?;
    let run_id = run["id"].as_i64().expect("run id");
    assert_eq!(run["manual"], true);
    wait_until("the manual run to end", Duration::from_secs(30), || async {
        let (status,): (String,) = sqlx::query_as("SELECT status FROM schedule_runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&stack.db.pool)
            .await?;
        Ok(status != "pending" && status != "running")
    })
    .await?;
    let (status, output): (String, sqlx::types::Json<Value>) =
        sqlx::query_as("SELECT status, output FROM schedule_runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&stack.db.pool)
            .await?;
    Ok((status, output.0))
}

/// A backend as `GET /v1/backends` shows it (null if it is not listed).
async fn backend_view(stack: &Stack, name: &str) -> anyhow::Result<Value> {
    let v: Value = stack
        .req(reqwest::Method::GET, "/v1/backends")
        .send()
        .await?
        .json()
        .await?;
    Ok(v["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["name"] == name))
        .cloned()
        .unwrap_or(Value::Null))
}

async fn backend_status(stack: &Stack, name: &str) -> anyhow::Result<String> {
    let b = backend_view(stack, name).await?;
    Ok(b["health"]["status"].as_str().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_fire_every_second_exactly_once() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    only_health_check_every_second(&stack).await?;
    let mut a = spawn_scheduler(&stack, "scheduler-a")?;
    let mut b = spawn_scheduler(&stack, "scheduler-b")?;
    // A minute side by side, as the scheduler's contract is stated.
    tokio::time::sleep(Duration::from_secs(60)).await;

    // The admin view while they run: last and next fire, last outcome, counts.
    let list: Value = stack
        .req(reqwest::Method::GET, "/v1/schedules")
        .send()
        .await?
        .json()
        .await?;
    let hc = list["schedules"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "health-check"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(hc["cron"], "* * * * * *", "{hc}");
    assert_eq!(hc["last_outcome"], "succeeded", "{hc}");
    assert!(
        hc["last_fire_at"].is_string() && hc["next_fire_at"].is_string(),
        "{hc}"
    );
    assert!(
        hc["run_counts"]["succeeded"].as_i64().unwrap_or(0) >= 45,
        "{hc}"
    );

    assert!(
        a.terminate(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success())
    );
    assert!(
        b.terminate(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success())
    );

    let runs = cron_runs(&stack, "health-check").await?;
    assert!(
        runs.len() >= 50,
        "expected a run for about every second of 60 s, got {}",
        runs.len()
    );
    assert_every_second(&runs);
    // Each fire time ran (or, if a pass came too late, was recorded as skipped) once.
    let ran = runs.iter().filter(|r| r.status == "succeeded").count();
    let skipped = runs.iter().filter(|r| r.status == "skipped").count();
    assert_eq!(
        ran + skipped,
        runs.len(),
        "no run failed or was left running"
    );
    assert!(
        ran >= runs.len() - 2,
        "with two replicas up, fire times run rather than skip: {ran} of {}",
        runs.len()
    );
    let runners: std::collections::HashSet<_> = runs.iter().filter_map(|r| r.runner).collect();
    assert!(!runners.is_empty() && runners.len() <= 2);

    // The runs listing of the API agrees with the table.
    let v: Value = stack
        .req(
            reqwest::Method::GET,
            "/v1/schedules/health-check/runs?limit=1000&status=succeeded",
        )
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(v["runs"].as_array().map(Vec::len), Some(ran), "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_scheduler_runs_the_missed_firing_once_and_records_the_rest_skipped()
-> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    only_health_check_every_second(&stack).await?;
    stack.start_scheduler()?;
    wait_until("three firings", Duration::from_secs(20), || async {
        Ok(cron_runs(&stack, "health-check").await?.len() >= 3)
    })
    .await?;
    let mut sched = stack.scheduler.take().expect("started above");
    assert!(
        sched
            .terminate(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success())
    );
    let before = cron_runs(&stack, "health-check").await?;
    let last_before = before.last().map(|r| r.fire_time).expect("runs exist");

    // Down for several fire times.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restarted_at = db_now(&stack).await?;
    stack.start_scheduler()?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut sched = stack.scheduler.take().expect("started above");
    assert!(
        sched
            .terminate(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success())
    );

    let all = cron_runs(&stack, "health-check").await?;
    assert_every_second(&all);
    let after: Vec<&RunRow> = all.iter().filter(|r| r.fire_time > last_before).collect();
    let first_run = after
        .iter()
        .position(|r| r.status != "skipped")
        .expect("the missed firing ran after the restart");
    assert!(
        first_run >= 4,
        "the fire times missed during ~5 s of downtime are recorded skipped: {first_run}"
    );
    assert!(after[..first_run].iter().all(|r| r.status == "skipped"));
    let catch_up = after[first_run];
    assert_eq!(catch_up.status, "succeeded");
    assert!(
        catch_up.fire_time <= restarted_at + chrono::Duration::seconds(3),
        "the catch-up is the latest missed fire time"
    );
    assert!(
        catch_up.started_at.is_some_and(|s| s >= restarted_at),
        "it ran after the restart"
    );
    // Exactly one run for the whole downtime: everything else before it was skipped, and
    // afterwards the schedule runs on time again.
    assert!(
        after[first_run + 1..]
            .iter()
            .filter(|r| r.status == "succeeded")
            .count()
            >= 1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_goes_down_then_healthy_again_and_its_jobs_finish() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack
        .env
        .push(("PINQ_HEALTH_PROBE_TIMEOUT_MS".into(), "800".into()));
    stack
        .env
        .push(("PINQ_HEALTH_DOWN_AFTER".into(), "2".into()));
    stack
        .env
        .push(("PINQ_HEALTH_HEALTHY_AFTER".into(), "2".into()));
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    only_health_check_every_second(&stack).await?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    wait_until("backend healthy", Duration::from_secs(30), || async {
        Ok(backend_status(&stack, "local").await? == "healthy")
    })
    .await?;
    let mut cids = stack.ipfs().add_unpinned(&unique_contents(3)).await?;
    // Shared content: the admin's owner and a tenant both pin it before the node stops.
    let shared = cids.pop().expect("three contents");
    let token: Value = stack
        .req(reqwest::Method::POST, "/v1/tokens")
        .json(&json!({"name": "sharer", "owner": "tenant-s"}))
        .send()
        .await?
        .json()
        .await?;
    let tenant = token["token"].as_str().unwrap_or_default().to_owned();
    let as_tenant = |body: Value| {
        let req = stack
            .http
            .post(format!("{}/v1/batches", stack.api_url))
            .bearer_auth(&tenant)
            .json(&body);
        async move {
            let v: Value = req.send().await?.json().await?;
            anyhow::Ok(v["id"].as_str().unwrap_or_default().parse::<Uuid>()?)
        }
    };
    let pin_shared = json!({"backends": ["local"], "ops": [{"op": "pin", "cid": shared}]});
    let admin_pin = stack.submit_ok(&pin_shared).await?;
    stack.wait_done(admin_pin, Duration::from_secs(60)).await?;
    let tenant_pin = as_tenant(pin_shared).await?;
    let done = stack.wait_done(tenant_pin, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["succeeded"], 1, "{done}");

    let stopped_at = db_now(&stack).await?;
    stack.ipfs.as_mut().expect("started").stop().await;
    wait_until("backend down", Duration::from_secs(20), || async {
        Ok(backend_status(&stack, "local").await? == "down")
    })
    .await?;
    // Down within three health-check periods: at most three probes failed first.
    let probes: Vec<(bool, String)> = sqlx::query_as(
        "SELECT p.ok, p.status FROM backend_probes p JOIN backends b ON b.id = p.backend_id
         WHERE b.name = 'local' AND p.probed_at > $1 ORDER BY p.probed_at",
    )
    .bind(stopped_at)
    .fetch_all(&stack.db.pool)
    .await?;
    let first_down = probes
        .iter()
        .position(|(_, s)| s == "down")
        .expect("a probe recorded down");
    assert!(
        first_down < 3,
        "down after {} probes: {probes:?}",
        first_down + 1
    );
    assert!(
        probes[..=first_down].iter().all(|(ok, _)| !ok),
        "{probes:?}"
    );
    assert!(
        probes[..first_down].iter().all(|(_, s)| s == "degraded"),
        "one failure only degrades: {probes:?}"
    );

    // Jobs submitted while it is down wait, and finish once it is back.
    let batch = stack
        .submit_ok(&json!({
            "backends": ["local"],
            "retry": {"max_attempts": 60, "base_ms": 200, "factor": 1.5, "max_delay_ms": 2000},
            "ops": cids.iter().map(|c| json!({"op": "pin", "cid": c})).collect::<Vec<_>>(),
        }))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = stack.batch(batch).await?;
    assert_eq!(
        b["counts"]["succeeded"], 0,
        "nothing can be pinned while the node is down: {b}"
    );
    assert_eq!(b["counts"]["failed"], 0, "jobs wait rather than fail: {b}");
    // The tenant's unpin of the shared content only removes its reference: it calls
    // nothing, so it does not wait for the node.
    let unpin =
        as_tenant(json!({"backends": ["local"], "ops": [{"op": "unpin", "cid": shared}]})).await?;
    let done = stack.wait_done(unpin, Duration::from_secs(20)).await?;
    assert_eq!(done["counts"]["succeeded"], 1, "{done}");
    assert_eq!(
        backend_status(&stack, "local").await?,
        "down",
        "still down when the unpin finished"
    );

    stack.ipfs.as_mut().expect("started").restart().await?;
    wait_until("backend healthy again", Duration::from_secs(30), || async {
        Ok(backend_status(&stack, "local").await? == "healthy")
    })
    .await?;
    let done = stack.wait_done(batch, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["succeeded"], 2, "{done}");
    let pins = stack.ipfs().pins().await?;
    assert!(
        pins.contains(&canonical_of(&shared).expect("valid")),
        "the admin's owner still holds the shared content"
    );
    for c in &cids {
        assert!(
            pins.contains(&canonical_of(c).expect("valid")),
            "the node holds {c}"
        );
    }

    // The history shows the failures and the recovery; the listing the latest probe.
    let h: Value = stack
        .req(reqwest::Method::GET, "/v1/backends/local/health?limit=1000")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(h["status"], "healthy", "{h}");
    let history = h["probes"].as_array().cloned().unwrap_or_default();
    assert!(
        history
            .iter()
            .any(|p| p["ok"] == false && p["status"] == "down"),
        "{h}"
    );
    assert!(
        history
            .first()
            .is_some_and(|p| p["ok"] == true && p["num_objects"].is_number()),
        "{h}"
    );
    let list: Value = stack
        .req(reqwest::Method::GET, "/v1/backends")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        list["backends"][0]["health"]["latest_probe"]["ok"], true,
        "{list}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_update_repairs_a_missing_pin_and_records_an_unmanaged_one() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    // Only the manual run below reconciles, so the figures are this test's.
    patch_schedule(&stack, "index-update", json!({"enabled": false})).await?;
    stack.start_worker()?;
    stack.start_scheduler()?;

    let cids = stack.ipfs().add_unpinned(&unique_contents(5)).await?;
    let (lost, kept, stranger, pending, held) = (&cids[0], &cids[1], &cids[2], &cids[3], &cids[4]);
    let batch = stack
        .submit_ok(&json!({"backends": ["local"], "ops": [
            {"op": "pin", "cid": lost}, {"op": "pin", "cid": kept}, {"op": "pin", "cid": held}]}))
        .await?;
    stack.wait_done(batch, Duration::from_secs(60)).await?;
    let key = |c: &str| canonical_of(c).expect("valid");
    let (lost_key, kept_key, held_key) = (key(lost), key(kept), key(held));
    let held_pinned_at = index_view(&stack, &held_key).await?.verified_at;
    assert!(
        held_pinned_at.is_some(),
        "a job's pin is verified when done"
    );

    // A pin job that has not finished yet, whose CID the node already holds (as when the
    // node has pinned it and the success is not written yet): the job will settle it,
    // so the index update leaves it alone rather than record it as nobody's. And a pin
    // job for a CID the index holds, which the node lost meanwhile: it stays `pinned`,
    // as its job will pin it again, but this listing has not seen it.
    let mut worker = stack.workers.remove(0);
    worker.terminate(Duration::from_secs(10)).await;
    let pending_batch = stack
        .submit_ok(&json!({"backends": ["local"], "ops": [
            {"op": "pin", "cid": pending}, {"op": "pin", "cid": held}]}))
        .await?;
    stack.ipfs().pin_direct(pending, true).await?;
    stack.ipfs().pin_direct(held, false).await?;

    // Behind pinq's back: unpin one of its pins, pin something it does not know.
    stack.ipfs().pin_direct(lost, false).await?;
    stack.ipfs().pin_direct(stranger, true).await?;

    let kept_version = row_version(&stack, &kept_key).await?;
    let before_run = db_now(&stack).await?;
    let (status, output) = run_now(&stack, "index-update").await?;
    assert_eq!(status, "succeeded", "{output}");
    assert_eq!(output["listed"], 3, "{output}");
    assert_eq!(output["verified"], 1, "{output}");
    assert_eq!(output["missing"], 1, "{output}");
    assert_eq!(output["newly_missing"], 1, "{output}");
    assert_eq!(output["repaired"], 1, "{output}");
    assert_eq!(output["unmanaged"], 1, "{output}");
    assert_eq!(output["backends"]["local"]["repaired"], 1, "{output}");

    // A listed pin is verified by the backend's mark, and its row is not written.
    let listed_at = pins_listed_at(&stack, "local").await?;
    assert!(listed_at >= before_run, "{listed_at} < {before_run}");
    assert_eq!(
        row_version(&stack, &kept_key).await?,
        kept_version,
        "the index update wrote a pin it only found on the node"
    );
    assert_eq!(
        index_view(&stack, &kept_key).await?.verified_at,
        Some(listed_at)
    );
    // The pin the listing did not show keeps when its job pinned it.
    let held_view = index_view(&stack, &held_key).await?;
    assert_eq!(held_view.status, "pinned");
    assert_eq!(held_view.verified_at, held_pinned_at);

    let stranger_key = canonical_of(stranger).expect("valid");
    let (st, owner): (String, Option<String>) =
        sqlx::query_as("SELECT status, owner FROM pins WHERE cid = $1")
            .bind(&stranger_key)
            .fetch_one(&stack.db.pool)
            .await?;
    assert_eq!((st.as_str(), owner), ("unmanaged", None));
    let pending_key = canonical_of(pending).expect("valid");
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM pins WHERE cid = $1")
        .bind(&pending_key)
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(rows, 0, "a CID with a pending job is not recorded");

    // The worker is back: the pending jobs pin for their owner.
    stack.start_worker()?;
    let done = stack
        .wait_done(pending_batch, Duration::from_secs(60))
        .await?;
    assert_eq!(done["counts"]["succeeded"], 2, "{done}");
    let (st, owner): (String, Option<String>) =
        sqlx::query_as("SELECT status, owner FROM pins WHERE cid = $1")
            .bind(&pending_key)
            .fetch_one(&stack.db.pool)
            .await?;
    assert_eq!((st.as_str(), owner.as_deref()), ("pinned", Some("admin")));

    // The repair job: low priority, the pin's owner, and it pins the CID again.
    let (priority, owner, batch_id): (i16, String, uuid::Uuid) = sqlx::query_as(
        "SELECT priority, owner, batch_id FROM jobs WHERE cid = $1 AND meta ? 'repair'",
    )
    .bind(&lost_key)
    .fetch_one(&stack.db.pool)
    .await?;
    assert_eq!(priority, 1);
    assert_eq!(owner, "admin");
    // The job list reaches jobs through their batches: a repair job is its batch's.
    let (same,): (bool,) = sqlx::query_as(
        "SELECT j.owner = b.owner AND j.created_at = b.created_at
         FROM jobs j JOIN batches b ON b.id = j.batch_id
         WHERE j.cid = $1 AND j.meta ? 'repair'",
    )
    .bind(&lost_key)
    .fetch_one(&stack.db.pool)
    .await?;
    assert!(
        same,
        "the repair job has its batch's owner and creation time"
    );
    let done = stack.wait_done(batch_id, Duration::from_secs(60)).await?;
    assert_eq!(done["counts"]["succeeded"], 1, "{done}");
    assert!(
        stack.ipfs().pins().await?.contains(&lost_key),
        "the node holds the repaired pin again"
    );
    assert!(
        stack.pin_index("local").await?.contains(&lost_key),
        "the index says pinned again"
    );

    // The next listing shows every pin again: the mark moves on, and speaks for the pin
    // the last one did not show, whose row loses its flag.
    let before_second = db_now(&stack).await?;
    let (status, output) = run_now(&stack, "index-update").await?;
    assert_eq!(status, "succeeded", "{output}");
    assert_eq!(output["verified"], 4, "{output}");
    assert_eq!(output["missing"], 0, "{output}");
    let listed_at = pins_listed_at(&stack, "local").await?;
    assert!(listed_at >= before_second, "{listed_at} < {before_second}");
    for k in [&lost_key, &kept_key, &held_key] {
        let view = index_view(&stack, k).await?;
        assert_eq!(
            (view.status.as_str(), view.verified_at),
            ("pinned", Some(listed_at)),
            "{k}"
        );
    }
    assert_eq!(
        row_version(&stack, &kept_key).await?,
        kept_version,
        "two listings, and the pin's row is as its job left it"
    );
    let (flagged,): (i64,) = sqlx::query_as("SELECT count(*) FROM pins WHERE unlisted")
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(flagged, 0, "every pin was listed");

    // The node loses a pin the last listing showed: it turns `missing` and keeps that
    // listing as when it was last seen. (No worker runs, so its repair job waits.)
    let mut worker = stack.workers.remove(0);
    worker.terminate(Duration::from_secs(10)).await;
    stack.ipfs().pin_direct(kept, false).await?;
    let (status, output) = run_now(&stack, "index-update").await?;
    assert_eq!(status, "succeeded", "{output}");
    assert_eq!(output["newly_missing"], 1, "{output}");
    let view = index_view(&stack, &kept_key).await?;
    assert_eq!(
        (view.status.as_str(), view.verified_at),
        ("missing", Some(listed_at))
    );

    // A run whose listing began before the last one reconciled (as when it waited behind
    // a later run) is dropped: it would otherwise restore the pin the node holds again.
    stack.ipfs().pin_direct(kept, true).await?;
    sqlx::query("UPDATE backends SET pins_listed_at = now() + interval '1 hour'")
        .execute(&stack.db.pool)
        .await?;
    let (status, output) = run_now(&stack, "index-update").await?;
    assert_eq!(status, "succeeded", "{output}");
    assert_eq!(
        output["backends"]["local"]["skipped"], "a listing begun later has been reconciled already",
        "{output}"
    );
    assert_eq!(index_view(&stack, &kept_key).await?.status, "missing");
    Ok(())
}

/// A pin as `GET /v1/pin-index` shows it.
struct IndexView {
    status: String,
    verified_at: Option<DateTime<Utc>>,
}

async fn index_view(stack: &Stack, cid: &str) -> anyhow::Result<IndexView> {
    let resp = stack
        .req(reqwest::Method::GET, &format!("/v1/pin-index?cid={cid}"))
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "GET /v1/pin-index: {}", resp.status());
    let v: Value = resp.json().await?;
    let pins = v["pins"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(pins.len() == 1, "one row for {cid}: {v}");
    Ok(IndexView {
        status: pins[0]["status"].as_str().unwrap_or_default().to_owned(),
        verified_at: serde_json::from_value(pins[0]["verified_at"].clone())?,
    })
}

/// The backend's last complete listing, as `GET /v1/backends` shows it.
async fn pins_listed_at(stack: &Stack, name: &str) -> anyhow::Result<DateTime<Utc>> {
    let b = backend_view(stack, name).await?;
    Ok(serde_json::from_value(b["pins_listed_at"].clone())?)
}

/// The transaction that last wrote a pin's row, and where it lies.
async fn row_version(stack: &Stack, cid: &str) -> anyhow::Result<(String, String)> {
    Ok(
        sqlx::query_as("SELECT xmin::text, ctid::text FROM pins WHERE cid = $1")
            .bind(cid)
            .fetch_one(&stack.db.pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_old_finished_batches_and_keeps_the_rest() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    patch_schedule(&stack, "prune", json!({"enabled": false})).await?;
    stack.start_worker()?;
    stack.start_scheduler()?;

    let cids = stack.ipfs().add_unpinned(&unique_contents(6)).await?;
    let mut batches = Vec::new();
    for pair in cids.chunks(2) {
        let ops: Vec<Value> = pair
            .iter()
            .map(|c| json!({"op": "pin", "cid": c}))
            .collect();
        let batch = stack.submit_ok(&json!({"ops": ops})).await?;
        stack.wait_done(batch, Duration::from_secs(60)).await?;
        batches.push(batch);
    }
    let (old, unfinished, recent) = (batches[0], batches[1], batches[2]);
    // Two batches are a year old; one of them still has a job waiting to retry.
    sqlx::query("UPDATE batches SET created_at = now() - interval '365 days' WHERE id = ANY($1)")
        .bind(vec![old, unfinished])
        .execute(&stack.db.pool)
        .await?;
    sqlx::query(
        "UPDATE jobs SET updated_at = now() - interval '365 days' WHERE batch_id = ANY($1)",
    )
    .bind(vec![old, unfinished])
    .execute(&stack.db.pool)
    .await?;
    // A success is recorded on its job's row; give every job an earlier attempt that was
    // retried, so each has a record in `job_attempts` as well, as a worker writes it.
    sqlx::query(
        "WITH again AS (
             UPDATE jobs SET attempt = attempt + 1 WHERE succeeded_by IS NOT NULL
             RETURNING id, succeeded_by, started_at
         )
         INSERT INTO job_attempts (job_id, attempt, worker_id, started_at, finished_at,
                                   outcome, error)
         SELECT id, 1, succeeded_by, started_at - interval '2 seconds',
                started_at - interval '1 second', 'retry', 'a transient error'
         FROM again",
    )
    .execute(&stack.db.pool)
    .await?;
    sqlx::query(
        "UPDATE jobs SET state = 'retry_wait', finished_at = NULL, succeeded_by = NULL,
                retry_at = now() + interval '1 day', run_at = now() + interval '1 day'
         WHERE id = (SELECT id FROM jobs WHERE batch_id = $1 ORDER BY seq LIMIT 1)",
    )
    .bind(unfinished)
    .execute(&stack.db.pool)
    .await?;

    let (old_records,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = $1",
    )
    .bind(old)
    .fetch_one(&stack.db.pool)
    .await?;
    assert_eq!(old_records, 2, "the old batch's jobs each have a record");

    let (status, output) = run_now(&stack, "prune").await?;
    assert_eq!(status, "succeeded", "{output}");
    assert_eq!(output["jobs_deleted"], 2, "{output}");
    assert_eq!(output["batches_deleted"], 1, "{output}");
    let left: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT b.id, (SELECT count(*) FROM jobs j WHERE j.batch_id = b.id)
         FROM batches b ORDER BY b.created_at",
    )
    .fetch_all(&stack.db.pool)
    .await?;
    assert_eq!(
        left,
        vec![(unfinished, 2), (recent, 2)],
        "the old finished batch went with its jobs; the unfinished and the recent stay whole"
    );
    let (attempts,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id")
            .fetch_one(&stack.db.pool)
            .await?;
    let (all_attempts,): (i64,) = sqlx::query_as("SELECT count(*) FROM job_attempts")
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(
        attempts, all_attempts,
        "the deleted jobs' attempts went with them"
    );
    assert_eq!(all_attempts, 4, "the kept batches' records stay");
    stack.db.check_tallies().await?;
    Ok(())
}
