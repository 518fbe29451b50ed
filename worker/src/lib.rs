//! pinq-worker: consumes job messages, claims each job with a fenced UPDATE, runs it on
//! its backend, records the outcome, and only then acknowledges the message.
//!
//! Only this crate acknowledges deliveries. A delivery whose job cannot be claimed (already
//! running, finished, or unknown) is a duplicate and is acknowledged and dropped. While a
//! job runs, its lease is extended; if the lease is lost, the job's result is discarded.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use pinq_core::amqp::{self, JobMessage};
use pinq_core::config::{LogArgs, ServiceArgs, WorkerArgs};
use pinq_core::db::{self, Backend, ClaimedJob, LeaseStatus, Outcome};
use pinq_core::kubo::{BackendError, KuboClient};
use pinq_core::model::Op;
use sqlx::PgPool;
use tokio::sync::{RwLock, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Command-line and environment settings of `pinq-worker`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pinq-worker",
    version,
    about = "pinq worker: runs pin jobs on IPFS backends"
)]
pub struct Args {
    #[command(flatten)]
    pub services: ServiceArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// How long a backend entry (and so its health status) is trusted before it is read again.
const BACKEND_CACHE_TTL: Duration = Duration::from_secs(3);
/// How long a job for a backend held `down` waits before it is looked at again. The relay
/// does not publish it while the backend stays down, so this is a floor, not a poll.
const DOWN_BACKEND_DEFER: Duration = Duration::from_secs(5);
/// Shortest wait of a job whose backend refused the connection.
const MIN_UNREACHABLE_DEFER: Duration = Duration::from_millis(250);
/// Longest pause between lease extensions (they also carry cancel requests).
const MAX_LEASE_TICK: Duration = Duration::from_secs(5);

struct Ctx {
    id: Uuid,
    pool: PgPool,
    args: WorkerArgs,
    http: reqwest::Client,
    backends: RwLock<HashMap<Uuid, (tokio::time::Instant, Backend)>>,
    in_flight: AtomicUsize,
    /// Cancelled when the grace period after SIGTERM is over: running jobs are handed back.
    abandon: CancellationToken,
}

/// What to do with a delivery once its jobs were handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Ack,
    /// Put the message back (the job was handed back, or the database was unreachable).
    Requeue,
}

/// Runs a worker until `shutdown` is cancelled: consumes, then drains in-flight jobs for up
/// to the grace period, hands back the rest, and returns.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = connect_db(&args.services, &shutdown).await?;
    let Some(pool) = pool else { return Ok(()) };
    let id = Uuid::new_v4();
    let host = hostname();
    db::register_worker(
        &pool,
        id,
        &host,
        std::process::id(),
        args.worker.concurrency,
    )
    .await
    .context("failed to register the worker")?;
    tracing::info!(worker_id = %id, concurrency = args.worker.concurrency, prefetch = args.worker.effective_prefetch(), "pinq-worker started");
    println!("pinq-worker {id} started");

    let ctx = Arc::new(Ctx {
        id,
        pool: pool.clone(),
        args: args.worker.clone(),
        http: KuboClient::http_client(),
        backends: RwLock::new(HashMap::new()),
        in_flight: AtomicUsize::new(0),
        abandon: CancellationToken::new(),
    });
    let heartbeat = tokio::spawn(heartbeat_loop(ctx.clone(), shutdown.clone()));

    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(args.worker.concurrency.max(1)));
    consume(&ctx, &args.services, &shutdown, &tracker, &permits).await;

    // Drain: finish in-flight jobs within the grace period, then hand back the rest.
    tracker.close();
    let grace = Duration::from_secs(args.worker.shutdown_grace_secs);
    let in_flight = ctx.in_flight.load(Ordering::Relaxed);
    tracing::info!(
        in_flight,
        grace_secs = grace.as_secs(),
        "draining in-flight jobs"
    );
    let _ = db::heartbeat(&pool, id, in_flight, "stopping").await;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = ctx.in_flight.load(Ordering::Relaxed),
            "grace period over; handing running jobs back to the queue"
        );
        ctx.abandon.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    }
    heartbeat.abort();
    let _ = db::heartbeat(&pool, id, 0, "stopped").await;
    pool.close().await;
    tracing::info!("pinq-worker stopped");
    Ok(())
}

/// Connects to PostgreSQL, retrying with backoff until it answers or shutdown.
async fn connect_db(
    services: &ServiceArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<PgPool>> {
    let mut backoff = reconnect_backoff();
    loop {
        match db::connect(&services.database_url, services.db_max_connections).await {
            Ok(pool) => return Ok(Some(pool)),
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in = ?wait, "PostgreSQL unreachable");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The consume loop, reconnecting to the broker with backoff whenever the connection
/// drops. Returns when `shutdown` is cancelled, after cancelling the consumer.
async fn consume(
    ctx: &Arc<Ctx>,
    services: &ServiceArgs,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    permits: &Arc<Semaphore>,
) {
    let tag = format!("pinq-worker-{}", ctx.id);
    let mut backoff = reconnect_backoff();
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = amqp::open_consumer(&services.amqp_url, &services.queue, ctx.args.effective_prefetch(), &tag) => r,
        };
        let (conn, channel, mut consumer) = match opened {
            Ok(c) => {
                tracing::info!(queue = %services.queue, "consuming");
                backoff = reconnect_backoff();
                c
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in = ?wait, "RabbitMQ unreachable");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        loop {
            // Take a permit before the next delivery so concurrency bounds work in flight
            // even if the prefetch is set higher.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => None,
                p = permits.clone().acquire_owned() => p.ok(),
            };
            let Some(permit) = permit else {
                // Stop receiving; deliveries not yet handed to us return to the queue when
                // the channel closes, and in-flight ones are acked or nacked by their tasks.
                let _ = channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await;
                // Keep the connection open while in-flight tasks ack; closed on drop.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    drop(conn);
                });
                return;
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => continue,
                d = consumer.next() => d,
            };
            match next {
                Some(Ok(delivery)) => {
                    let ctx = ctx.clone();
                    tracker.spawn(async move {
                        handle_delivery(&ctx, delivery).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "lost the broker connection; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!("consumer cancelled by the broker; reconnecting");
                    break;
                }
            }
        }
    }
}

async fn handle_delivery(ctx: &Ctx, delivery: Delivery) {
    let message: JobMessage = match serde_json::from_slice(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            // A message no worker can read would loop forever if requeued.
            tracing::error!(error = %e, "dropping an unreadable message");
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return;
        }
    };
    let mut disposition = Disposition::Ack;
    for job_id in message.jobs {
        ctx.in_flight.fetch_add(1, Ordering::Relaxed);
        let d = run_job(ctx, job_id).await;
        ctx.in_flight.fetch_sub(1, Ordering::Relaxed);
        if d == Disposition::Requeue {
            disposition = Disposition::Requeue;
        }
    }
    let result = match disposition {
        Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
        Disposition::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
    if let Err(e) = result {
        // The channel is gone; the broker redelivers the message, and the fenced claim
        // makes the redelivery a no-op if the job already finished.
        tracing::debug!(error = %e, "could not settle a delivery");
    }
}

async fn run_job(ctx: &Ctx, job_id: Uuid) -> Disposition {
    let lease = Duration::from_secs(ctx.args.lease_secs.max(3));
    let job = match db::claim_job(&ctx.pool, job_id, ctx.id, lease).await {
        Ok(Some(job)) => job,
        Ok(None) => {
            tracing::info!(job_id = %job_id, "delivery for a job that is not queued (duplicate or stale); dropped");
            return Disposition::Ack;
        }
        Err(e) => {
            tracing::warn!(job_id = %job_id, error = %e, "could not claim job; requeueing");
            // Do not spin on a dead database: slow the redelivery down a little.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Disposition::Requeue;
        }
    };
    let span = tracing::info_span!("job", job_id = %job.id, batch_id = %job.batch_id, op = %job.op, cid = %job.cid, attempt = job.attempt);
    let _enter = span.enter();
    drop(_enter);

    // A backend the health checks hold down is not called: the job waits without spending
    // an attempt, and the worker moves on to jobs for healthy backends.
    let backend = match backend(ctx, job.backend_id).await {
        Ok(b) if b.status == "down" => {
            tracing::info!(job_id = %job.id, backend = %b.name, "backend is down; job deferred");
            let run_at =
                Utc::now() + chrono::Duration::from_std(DOWN_BACKEND_DEFER).unwrap_or_default();
            write_outcome(ctx, &job, &Outcome::Deferred { run_at }).await;
            return Disposition::Ack;
        }
        other => other,
    };

    let lost = CancellationToken::new();
    let cancel = CancellationToken::new();
    let keeper = tokio::spawn(keep_lease(
        ctx.pool.clone(),
        (job.id, ctx.id, job.attempt),
        lease,
        lost.clone(),
        cancel.clone(),
    ));
    let started = tokio::time::Instant::now();
    let result = tokio::select! {
        r = execute(ctx, &job, backend) => Some(r),
        _ = lost.cancelled() => None,
        _ = cancel.cancelled() => {
            keeper.abort();
            tracing::info!(job_id = %job.id, "job cancelled while running");
            write_outcome(ctx, &job, &Outcome::Cancelled).await;
            return Disposition::Ack;
        }
        _ = ctx.abandon.cancelled() => {
            keeper.abort();
            let outcome = Outcome::Released { reason: "worker shut down before the job finished".into() };
            write_outcome(ctx, &job, &outcome).await;
            return Disposition::Requeue;
        }
    };
    keeper.abort();
    let Some(result) = result else {
        tracing::warn!(job_id = %job.id, "lease lost while running; result discarded");
        return Disposition::Ack;
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let outcome = match result {
        Ok(()) => {
            tracing::info!(job_id = %job.id, op = %job.op, cid = %job.cid, elapsed_ms, "job succeeded");
            Outcome::Succeeded
        }
        Err(e) if e.is_unreachable() => {
            // No connection: the backend never saw the request, so the attempt is not
            // spent. The job waits a short, jittered while and comes back; once the health
            // checks mark the backend down, the relay holds it until the backend is back.
            let policy = job.retry_policy();
            let delay = policy
                .delay(job.attempt.max(1) as u32, &mut rand::rng())
                .clamp(MIN_UNREACHABLE_DEFER, DOWN_BACKEND_DEFER);
            tracing::warn!(job_id = %job.id, error = %e, retry_in_ms = delay.as_millis() as u64, "backend unreachable; job deferred without spending an attempt");
            Outcome::Deferred {
                run_at: Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default(),
            }
        }
        Err(e) => {
            let policy = job.retry_policy();
            let attempts = job.attempt.max(0) as u32;
            if e.is_transient() && policy.allows_another(attempts) {
                let delay = policy.delay(attempts, &mut rand::rng());
                tracing::warn!(job_id = %job.id, error = %e, retry_in_ms = delay.as_millis() as u64, "job failed; will retry");
                Outcome::Retry {
                    error: e.to_string(),
                    run_at: Utc::now()
                        + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero()),
                }
            } else {
                let error = if e.is_transient() {
                    format!("gave up after {attempts} attempts: {e}")
                } else {
                    e.to_string()
                };
                tracing::warn!(job_id = %job.id, error = %error, "job failed");
                Outcome::Failed { error }
            }
        }
    };
    write_outcome(ctx, &job, &outcome).await;
    Disposition::Ack
}

/// Writes an outcome, retrying while PostgreSQL is unreachable (up to the lease: after
/// that the relay takes the job back anyway and the write would be fenced off).
async fn write_outcome(ctx: &Ctx, job: &ClaimedJob, outcome: &Outcome) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(ctx.args.lease_secs.max(3));
    let mut backoff = reconnect_backoff();
    loop {
        match db::finish_job(&ctx.pool, job, ctx.id, outcome).await {
            Ok(true) => return,
            Ok(false) => {
                tracing::warn!(job_id = %job.id, "lease no longer ours; outcome not recorded");
                return;
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                if tokio::time::Instant::now() + wait > deadline {
                    tracing::error!(job_id = %job.id, error = %e, "could not record the outcome; the lease will expire and the job will run again");
                    return;
                }
                tracing::warn!(job_id = %job.id, error = %e, "could not record the outcome; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Extends the lease every third of its length (at most every few seconds, since the
/// extension also reports cancel requests); cancels `lost` if the lease is gone and
/// `cancel` if a client cancelled the job.
async fn keep_lease(
    pool: PgPool,
    (job_id, worker_id, attempt): (Uuid, Uuid, i32),
    lease: Duration,
    lost: CancellationToken,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval((lease / 3).min(MAX_LEASE_TICK));
    tick.tick().await;
    loop {
        tick.tick().await;
        match db::extend_lease(&pool, job_id, worker_id, attempt, lease).await {
            Ok(LeaseStatus::Held) => {}
            Ok(LeaseStatus::CancelRequested) => {
                cancel.cancel();
                return;
            }
            Ok(LeaseStatus::Lost) => {
                lost.cancel();
                return;
            }
            // A database blip: try again next tick; the lease has slack for two misses.
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "could not extend lease"),
        }
    }
}

async fn backend(ctx: &Ctx, id: Uuid) -> Result<Backend, BackendError> {
    if let Some((at, b)) = ctx.backends.read().await.get(&id)
        && at.elapsed() < BACKEND_CACHE_TTL
    {
        return Ok(b.clone());
    }
    let fetched = db::backend_by_id(&ctx.pool, id)
        .await
        .map_err(|e| BackendError::Unreachable(format!("could not read backend {id}: {e}")))?;
    let Some(b) = fetched else {
        return Err(BackendError::Rejected {
            status: 404,
            message: format!("backend {id} no longer exists"),
        });
    };
    ctx.backends
        .write()
        .await
        .insert(id, (tokio::time::Instant::now(), b.clone()));
    Ok(b)
}

/// Runs the job's operation on its backend.
async fn execute(
    ctx: &Ctx,
    job: &ClaimedJob,
    backend: Result<Backend, BackendError>,
) -> Result<(), BackendError> {
    let backend = backend?;
    if !backend.enabled {
        return Err(BackendError::Transient {
            status: 503,
            message: format!("backend '{}' is disabled", backend.name),
        });
    }
    let client = KuboClient::new(ctx.http.clone(), &backend.url);
    let timeout = Duration::from_secs(ctx.args.pin_timeout_secs.max(1));
    let op: Op = job.op.parse().map_err(|_| BackendError::Rejected {
        status: 400,
        message: format!("unknown op '{}'", job.op),
    })?;
    match op {
        Op::Pin => client.pin_add(&job.cid, timeout).await,
        Op::Unpin => client.pin_rm(&job.cid, timeout).await,
        Op::Replace => {
            client.pin_add(&job.cid, timeout).await?;
            match &job.replaces_cid {
                Some(old) if old != &job.cid => client.pin_rm(old, timeout).await,
                _ => Ok(()),
            }
        }
    }
}

async fn heartbeat_loop(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(ctx.args.heartbeat_secs.max(1)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let n = ctx.in_flight.load(Ordering::Relaxed);
        if let Err(e) = db::heartbeat(&ctx.pool, ctx.id, n, "running").await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
