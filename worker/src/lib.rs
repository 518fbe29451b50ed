//! pinq-worker: consumes job messages, claims their jobs with a fenced UPDATE, runs them
//! on their backends, and records the outcomes.
//!
//! Only this crate acknowledges deliveries. A message names up to `PINQ_MESSAGE_JOBS` jobs;
//! the worker waits for free capacity, claims them in one statement, and acknowledges the
//! message as soon as the claim has committed: from then on the job's lease, not the
//! message, guards it (a worker that dies leaves leases that expire, and the relay
//! publishes those jobs again). Jobs that cannot be claimed (already running, finished,
//! or unknown) were duplicate deliveries and are dropped. Successful outcomes are written
//! in groups by one completer task, two groups at a time: whatever finished while the
//! groups under way were being written goes in the next, so a busy worker commits many jobs
//! per transaction and an idle one commits at once.
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
use tokio::sync::{OwnedSemaphorePermit, RwLock, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

mod calls;
mod pin_groups;
mod slots;
use calls::Calls;
use pin_groups::PinGroups;
use slots::Slots;

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
/// An entry not read again for this long (its backend deleted, or without jobs for a
/// while) is dropped with its client and gatherer when another entry is stored; the next
/// job for it reads the backend again and starts a new client.
const BACKEND_CACHE_IDLE: Duration = Duration::from_secs(60);
/// How long a job for a backend held `down` waits before it is looked at again. The relay
/// does not publish it while the backend stays down, so this is a floor, not a poll.
const DOWN_BACKEND_DEFER: Duration = Duration::from_secs(5);
/// Shortest wait of a job whose backend refused the connection.
const MIN_UNREACHABLE_DEFER: Duration = Duration::from_millis(250);
/// Longest pause between lease extensions (they also carry cancel requests).
const MAX_LEASE_TICK: Duration = Duration::from_secs(5);

/// A saturated worker claims once at least 1/CLAIM_SHARE of its slots are free.
const CLAIM_SHARE: usize = 2;

/// The smallest claim of a saturated worker.
fn claim_least(concurrency: usize) -> usize {
    concurrency.max(1).div_ceil(CLAIM_SHARE)
}

/// How many jobs beyond its concurrency a worker may hold claimed, waiting for a backend
/// call to end: two of its smallest claims. The next claim then runs while the jobs
/// claimed before it still keep every call busy, so the backends never wait for the
/// worker's round trip to PostgreSQL. Such a job waits for a call to end (milliseconds
/// against an idle node, longer against a busy one); its claim's lease is kept meanwhile.
fn claim_headroom(concurrency: usize) -> usize {
    2 * claim_least(concurrency)
}

/// Most successful jobs written in one statement.
const MAX_COMPLETION_GROUP: usize = 1024;

/// Groups of successes written at once, each in its own transaction. With one, a worker
/// kept PostgreSQL on little more than one core: two groups' statements and commits
/// overlap, and the worker's next claims are not held behind a single write. The groups'
/// jobs are disjoint, and two running jobs never share a pin-index row (jobs on one CID
/// and backend run one at a time), so the writes do not wait on each other's rows.
const COMPLETION_WRITERS: u32 = 2;

struct Ctx {
    id: Uuid,
    pool: PgPool,
    args: WorkerArgs,
    http: reqwest::Client,
    /// Backends read recently, each with its client, for [`BACKEND_CACHE_TTL`].
    backends: RwLock<HashMap<Uuid, (tokio::time::Instant, Arc<CachedBackend>)>>,
    in_flight: AtomicUsize,
    /// One slot per job claimed and not yet done calling its backend: the concurrency
    /// plus a small headroom (see [`claim_headroom`]), handed to the deliveries waiting
    /// for them by priority.
    permits: Slots,
    /// One per backend call in flight: the concurrency, handed to the claimed jobs waiting
    /// for one by priority.
    calls: Arc<Calls>,
    /// Successful jobs on their way to the completer.
    completions: mpsc::Sender<Completion>,
    /// Cancelled when the grace period after SIGTERM is over: running jobs are handed back.
    abandon: CancellationToken,
    /// Every delivery's task and every group of running jobs; drained on shutdown.
    tasks: TaskTracker,
    /// Cancelled on SIGTERM: deliveries not claimed yet go back to the queue.
    stopping: CancellationToken,
}

/// A backend as last read, with a client for its URL whose pins are sent in groups.
struct CachedBackend {
    backend: Backend,
    pins: Arc<PinGroups>,
}

/// A successful job for the completer to record; `written` says whether the lease was
/// still this worker's when it did.
struct Completion {
    job: ClaimedJob,
    written: oneshot::Sender<bool>,
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
    tracing::info!(worker_id = %id, concurrency = args.worker.concurrency, prefetch = args.worker.effective_prefetch(args.services.message_jobs), "pinq-worker started");
    println!("pinq-worker {id} started");

    // Successes waiting to be written hold no slot, so this bounds them, beside the groups
    // being written: as many as the worker runs at once, and at least one whole group, so
    // that a job whose call has ended gives its slot back rather than wait for a write.
    let (completions, completion_rx) =
        mpsc::channel(args.worker.concurrency.max(MAX_COMPLETION_GROUP));
    let calls = Calls::new(args.worker.concurrency.max(1));
    let completer = tokio::spawn(completer_loop(
        pool.clone(),
        id,
        Duration::from_secs(args.worker.lease_secs.max(3)),
        Linger {
            calls: calls.clone(),
            concurrency: args.worker.concurrency.max(1),
            group: claim_least(args.worker.concurrency),
        },
        completion_rx,
    ));
    let ctx = Arc::new(Ctx {
        id,
        pool: pool.clone(),
        args: args.worker.clone(),
        http: KuboClient::http_client(),
        backends: RwLock::new(HashMap::new()),
        in_flight: AtomicUsize::new(0),
        permits: Slots::new(
            args.worker.concurrency.max(1) + claim_headroom(args.worker.concurrency),
        ),
        calls,
        completions,
        abandon: CancellationToken::new(),
        tasks: TaskTracker::new(),
        stopping: shutdown.clone(),
    });
    let heartbeat = tokio::spawn(heartbeat_loop(ctx.clone(), shutdown.clone()));

    let tracker = ctx.tasks.clone();
    let broker = consume(&ctx, &args.services, &shutdown).await;

    // Drain: finish in-flight jobs within the grace period, then hand back the rest.
    tracker.close();
    let grace = Duration::from_secs(args.worker.shutdown_grace_secs);
    let in_flight = ctx.in_flight.load(Ordering::Relaxed);
    tracing::info!(
        in_flight,
        grace_secs = grace.as_secs(),
        "draining in-flight jobs"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = ctx.in_flight.load(Ordering::Relaxed),
            "grace period over; handing running jobs back to the queue"
        );
        ctx.abandon.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    }
    // Closing the connection cleanly flushes the last acknowledgements and requeues
    // whatever was delivered but not claimed.
    if let Some(conn) = broker {
        let _ = conn.close(200, "worker stopped".into()).await;
    }
    heartbeat.abort();
    let _ = heartbeat.await;
    // The last sender goes with the context; the completer then writes what it holds.
    drop(ctx);
    let _ = completer.await;
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
/// drops. It consumes the job queue and the urgent queue, each on a channel with a prefetch
/// window of its own (so urgent messages never wait for the job queue's window to move),
/// and hands every delivery to [`handle_delivery`], where both meet in the worker's slots
/// by priority. Returns when `shutdown` is cancelled, after cancelling the consumers, with
/// the open connection (the tasks still running need it to settle their deliveries).
async fn consume(
    ctx: &Arc<Ctx>,
    services: &ServiceArgs,
    shutdown: &CancellationToken,
) -> Option<lapin::Connection> {
    let tag = format!("pinq-worker-{}", ctx.id);
    let prefetch = ctx.args.effective_prefetch(services.message_jobs);
    let queues = [services.queue.clone(), amqp::urgent_queue(&services.queue)];
    let mut backoff = reconnect_backoff();
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = amqp::open_consumers(&services.amqp_url, &queues, prefetch, &tag) => r,
        };
        let (conn, consumers) = match opened {
            Ok(c) => {
                tracing::info!(queues = ?queues, prefetch, "consuming");
                backoff = reconnect_backoff();
                c
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in = ?wait, "RabbitMQ unreachable");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let mut channels = Vec::with_capacity(consumers.len());
        let mut streams = Vec::with_capacity(consumers.len());
        for c in consumers {
            channels.push(c.channel);
            // Each consumer's end is marked, so that one cancelled by the broker is noticed
            // even while the other goes on.
            streams.push(
                c.consumer
                    .map(Some)
                    .chain(futures::stream::once(async { None }))
                    .boxed(),
            );
        }
        let mut deliveries = futures::stream::select_all(streams);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => None,
                d = deliveries.next() => Some(d.flatten()),
            };
            match next {
                None => {
                    // Stop receiving. Deliveries already here that were not claimed yet are
                    // requeued by their tasks.
                    for channel in &channels {
                        let _ = channel
                            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                            .await;
                    }
                    return Some(conn);
                }
                Some(Some(Ok(delivery))) => {
                    ctx.tasks.spawn(handle_delivery(ctx.clone(), delivery));
                }
                Some(Some(Err(e))) => {
                    tracing::warn!(error = %e, "lost the broker connection; reconnecting");
                    break;
                }
                Some(None) => {
                    tracing::warn!("a consumer was cancelled by the broker; reconnecting");
                    break;
                }
            }
        }
        // Reconnecting: the old connection's deliveries not yet acknowledged go back to
        // their queues when it closes.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            conn.close(320, "reconnecting".into()),
        )
        .await;
    }
}

async fn handle_delivery(ctx: Arc<Ctx>, delivery: Delivery) {
    let message: JobMessage = match serde_json::from_slice(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            // A message no worker can read would loop forever if requeued.
            tracing::error!(error = %e, "dropping an unreadable message");
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return;
        }
    };
    // Claim only what can start as soon as the calls in flight end, so claimed jobs never
    // wait behind more than that while their leases run. A slot is a job claimed and not
    // yet done calling its backend; there are as many as the concurrency plus a headroom
    // (`claim_headroom`), so the next claim overlaps the calls in flight. Wait until half
    // of the concurrency in slots is free (or as many as the message has jobs left, if
    // fewer), take whatever other slots are free at that moment, claim that many of the
    // message's jobs in one statement and start them, and repeat until the whole message
    // is claimed. Waiting for a share of the slots rather than for one keeps claims (and
    // their commits) few and large when the worker is saturated; when it is not, the slots
    // are free and nothing waits. Deliveries are served in arrival order within a priority
    // (`Slots`), so a message is never starved by others of its priority; a message of a
    // higher priority is served first. A message keeps its place in line until its last
    // part is claimed: the slots that come free while one of its parts is being claimed
    // wait for its next part. A message that outranks one already waiting (the worker is
    // saturated with lower priorities) claims its first part as soon as one slot is free,
    // so its first job starts after one backend call ends rather than after half the
    // concurrency of them; its later parts wait for a share like any other. Its jobs then
    // take the backend calls that end before the lower priorities' claimed jobs (`Calls`).
    let ticket = ctx
        .permits
        .ticket(delivery.properties.priority().unwrap_or(0));
    let mut rest: &[Uuid] = &message.jobs;
    let least = claim_least(ctx.args.concurrency);
    let mut share = if ctx.permits.outranks_a_waiter(&ticket) {
        1
    } else {
        least
    };
    let mut place = Some(ctx.permits.line_up(&ticket));
    while !rest.is_empty() {
        let Some(in_line) = place.as_ref() else { break };
        let want = u32::try_from(rest.len().min(share)).unwrap_or(u32::MAX);
        share = least;
        let permit = tokio::select! {
            p = ctx.permits.acquire_in_line(in_line, want) => p.ok(),
            _ = ctx.stopping.cancelled() => None,
        };
        let Some(mut permit) = permit else {
            // Stopping: what is not claimed yet goes back to the queue for another worker
            // (jobs of this message claimed already are dropped there as duplicates).
            requeue(&delivery).await;
            return;
        };
        while permit.num_permits() < rest.len() {
            match ctx.permits.try_acquire() {
                Some(more) => permit.merge(more),
                None => break,
            }
        }
        let (ids, tail) = rest.split_at(permit.num_permits().min(rest.len()));
        rest = tail;
        if rest.is_empty() {
            // The last part: the next delivery in line may take slots while this claims.
            place = None;
        }
        let lease = Duration::from_secs(ctx.args.lease_secs.max(3));
        let claimed = match db::claim_jobs(&ctx.pool, ids, ctx.id, lease).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, jobs = ids.len(), "could not claim jobs; requeueing the message");
                drop(permit);
                // Out of line before the pause, so the deliveries behind it are not held.
                drop(place);
                // Do not spin on a dead database: slow the redelivery down a little.
                tokio::time::sleep(Duration::from_secs(1)).await;
                requeue(&delivery).await;
                return;
            }
        };
        if claimed.len() < ids.len() {
            tracing::info!(
                not_claimed = ids.len() - claimed.len(),
                "jobs of the message not claimed: duplicate or stale deliveries, or parked \
                 behind an earlier job on the same CID"
            );
            if let Some(unused) = permit.split(ids.len() - claimed.len()) {
                drop(unused);
            }
        }
        if !claimed.is_empty() {
            ctx.tasks.spawn(run_group(ctx.clone(), claimed, permit));
        }
    }
    // Every job is claimed: from here on its lease, not the message, keeps it safe. (If a
    // later part could not be claimed, the message went back to the queue above, and the
    // parts already claimed are dropped as duplicates when it comes back.)
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // A redelivery finds the jobs running and is dropped.
        tracing::debug!(error = %e, "could not acknowledge a delivery");
    }
}

async fn requeue(delivery: &Delivery) {
    let nack = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    if let Err(e) = delivery.nack(nack).await {
        // The channel is gone; the broker redelivers the message anyway.
        tracing::debug!(error = %e, "could not requeue a delivery");
    }
}

/// Per-job signals from the lease keeper.
#[derive(Clone, Default)]
struct JobSignals {
    lost: CancellationToken,
    cancel: CancellationToken,
}

/// Runs the jobs of one claim concurrently, each holding one permit while it calls its
/// backend, under one lease keeper that extends the claim's lease.
async fn run_group(ctx: Arc<Ctx>, jobs: Vec<ClaimedJob>, mut permit: OwnedSemaphorePermit) {
    let lease = Duration::from_secs(ctx.args.lease_secs.max(3));
    let claim_id = jobs.first().map_or(0, |j| j.claim_id);
    ctx.in_flight.fetch_add(jobs.len(), Ordering::Relaxed);
    let signals: HashMap<Uuid, JobSignals> =
        jobs.iter().map(|j| (j.id, JobSignals::default())).collect();
    let running = Arc::new(std::sync::Mutex::new(
        jobs.iter()
            .map(|j| (j.id, j.attempt))
            .collect::<HashMap<Uuid, i32>>(),
    ));
    let keeper = tokio::spawn(keep_leases(
        ctx.pool.clone(),
        ctx.id,
        claim_id,
        lease,
        running.clone(),
        signals.clone(),
    ));
    let mut runs = Vec::with_capacity(jobs.len());
    for job in jobs {
        let one = permit.split(1);
        let sig = signals.get(&job.id).cloned().unwrap_or_default();
        let running = running.clone();
        let ctx = &ctx;
        runs.push(async move {
            run_job(ctx, &job, &sig, one).await;
            if let Ok(mut r) = running.lock() {
                r.remove(&job.id);
            }
            ctx.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    futures::future::join_all(runs).await;
    keeper.abort();
}

/// Runs one job and records its outcome. `slot` is its share of the worker's concurrency:
/// a success gives it back as soon as the completer has the job, so the next job starts
/// while the outcome is being written (the completer's bounded channel holds the worker
/// back if writing falls behind; the lease is still kept until the write is done).
///
/// A future is as large as its largest state, and a worker holds one of these per job in
/// flight and moves it into the group's set of runs: the rare outcomes' writes (each a
/// transaction of its own) and a backend read that missed the cache are boxed, so that
/// the common path (a call slot, the call, the hand-over to the completer) sets the size,
/// about 1 KiB instead of 9.6 KiB.
async fn run_job(
    ctx: &Ctx,
    job: &ClaimedJob,
    sig: &JobSignals,
    slot: Option<OwnedSemaphorePermit>,
) {
    // A backend the health checks hold down is not called: the job waits without spending
    // an attempt, and the worker moves on to jobs for healthy backends. (An unpin that only
    // removes its owner's reference does not call it, and goes on.)
    let backend = match backend(ctx, job.backend_id).await {
        Ok(b) if b.backend.status == "down" && job.calls_node() => {
            tracing::info!(job_id = %job.id, backend = %b.backend.name, "backend is down; job deferred");
            let run_at =
                Utc::now() + chrono::Duration::from_std(DOWN_BACKEND_DEFER).unwrap_or_default();
            Box::pin(write_outcome(ctx, job, &Outcome::Deferred { run_at })).await;
            return;
        }
        other => other,
    };

    let started = tokio::time::Instant::now();
    let result = tokio::select! {
        r = async {
            // A backend call slot, unless the job calls nothing.
            let _call = if job.calls_node() {
                Some(ctx.calls.acquire(u8::try_from(job.priority).unwrap_or(0)).await)
            } else {
                None
            };
            execute(job, backend).await
        } => r,
        _ = sig.lost.cancelled() => {
            tracing::warn!(job_id = %job.id, "lease lost while running; result discarded");
            return;
        }
        _ = sig.cancel.cancelled() => {
            tracing::info!(job_id = %job.id, "job cancelled while running");
            Box::pin(write_outcome(ctx, job, &Outcome::Cancelled)).await;
            return;
        }
        _ = ctx.abandon.cancelled() => {
            let outcome = Outcome::Released { reason: "worker shut down before the job finished".into() };
            Box::pin(write_outcome(ctx, job, &outcome)).await;
            return;
        }
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let outcome = match result {
        Ok(()) => {
            tracing::debug!(job_id = %job.id, op = %job.op, cid = %job.cid, elapsed_ms, "job succeeded");
            let (written, answer) = oneshot::channel();
            let completion = Completion {
                job: job.clone(),
                written,
            };
            if ctx.completions.send(completion).await.is_err() {
                tracing::error!(job_id = %job.id, "completer gone; the lease will expire and the job will run again");
                return;
            }
            drop(slot);
            if !answer.await.unwrap_or(false) {
                tracing::warn!(job_id = %job.id, "lease no longer ours; outcome not recorded");
            }
            return;
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
    Box::pin(write_outcome(ctx, job, &outcome)).await;
}

/// When the completer waits for a small group to grow before writing it.
struct Linger {
    /// The worker's backend calls: when none is free, the worker is saturated.
    calls: Arc<Calls>,
    /// The worker's concurrency: the calls in flight are this less the free ones.
    concurrency: usize,
    /// A group smaller than this is held back, while the worker is saturated, for up to
    /// [`LINGER`].
    group: usize,
}

/// Longest wait of a small group of successes while the worker is saturated.
const LINGER: Duration = Duration::from_millis(10);

/// How many times the completer yields to the runtime, while backend calls are in flight,
/// before it writes a group that nothing else has joined.
const SETTLE_YIELDS: usize = 8;

/// Records successful jobs in groups: it takes whatever is waiting, writes it in one
/// transaction, and answers each job, with up to [`COMPLETION_WRITERS`] groups being
/// written at once. Ends when every sender is gone and every write has ended.
///
/// While every backend call is taken, a small group waits up to [`LINGER`] for more:
/// the jobs' slots were given back when they were handed over, so the wait costs the
/// worker no throughput, only a few milliseconds before the successes are visible, and
/// it spares PostgreSQL a commit per handful of jobs. A worker with calls to spare
/// writes at once, after yielding to the runtime up to [`SETTLE_YIELDS`] times while other
/// calls are in flight: the answers of one claim's jobs arrive together, and this lets
/// them share a write instead of queueing behind each other's commits.
async fn completer_loop(
    pool: PgPool,
    worker_id: Uuid,
    patience: Duration,
    linger: Linger,
    mut rx: mpsc::Receiver<Completion>,
) {
    let writers = Arc::new(tokio::sync::Semaphore::new(COMPLETION_WRITERS as usize));
    loop {
        // A writer's turn first: while every writer is busy, successes gather in the
        // channel and make the next group.
        let Ok(turn) = writers.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = rx.recv().await else { break };
        let mut group = vec![first];
        let until = tokio::time::Instant::now() + LINGER;
        let mut yields = 0;
        while group.len() < MAX_COMPLETION_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                // Jobs of one claim tend to finish together: before writing, let the
                // runtime deliver the answers that have just arrived, so they join this
                // group instead of waiting for its commit. Each yield costs microseconds.
                Err(_)
                    if yields < SETTLE_YIELDS && linger.calls.available() < linger.concurrency =>
                {
                    yields += 1;
                    tokio::task::yield_now().await;
                }
                Err(_) if group.len() < linger.group && linger.calls.available() == 0 => {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(c)) => group.push(c),
                        Ok(None) | Err(_) => break,
                    }
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            write_successes(&pool, worker_id, patience, group).await;
            drop(turn);
        });
    }
    // The writes under way end before the completer does.
    let _ = writers.acquire_many(COMPLETION_WRITERS).await;
}

/// Writes one group of successes, retrying while PostgreSQL is unreachable (up to
/// `patience`: the leases run out after that anyway), and answers each job.
async fn write_successes(
    pool: &PgPool,
    worker_id: Uuid,
    patience: Duration,
    group: Vec<Completion>,
) {
    let jobs: Vec<&ClaimedJob> = group.iter().map(|c| &c.job).collect();
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = reconnect_backoff();
    let written = loop {
        match db::finish_succeeded(pool, &jobs, worker_id).await {
            Ok(ids) => break ids,
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                if tokio::time::Instant::now() + wait > deadline {
                    tracing::error!(error = %e, jobs = jobs.len(), "could not record successes; their leases will expire and they will run again");
                    break Vec::new();
                }
                tracing::warn!(error = %e, jobs = jobs.len(), "could not record successes; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    };
    let written: std::collections::HashSet<Uuid> = written.into_iter().collect();
    for c in group {
        let _ = c.written.send(written.contains(&c.job.id));
    }
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

/// Extends the lease of a group's claim every third of the lease (at most every few
/// seconds, since the extension also reports cancel requests) while some of its jobs run,
/// and signals each job whose lease is gone or whose cancellation was requested.
async fn keep_leases(
    pool: PgPool,
    worker_id: Uuid,
    claim_id: i64,
    lease: Duration,
    running: Arc<std::sync::Mutex<HashMap<Uuid, i32>>>,
    signals: HashMap<Uuid, JobSignals>,
) {
    let mut tick = tokio::time::interval((lease / 3).min(MAX_LEASE_TICK));
    tick.tick().await;
    loop {
        tick.tick().await;
        let jobs: Vec<(Uuid, i32)> = match running.lock() {
            Ok(r) => r.iter().map(|(id, a)| (*id, *a)).collect(),
            Err(_) => return,
        };
        if jobs.is_empty() {
            return;
        }
        match db::extend_leases(&pool, claim_id, &jobs, worker_id, lease).await {
            Ok(statuses) => {
                for (id, status) in statuses {
                    let Some(sig) = signals.get(&id) else {
                        continue;
                    };
                    match status {
                        LeaseStatus::Held => {}
                        LeaseStatus::CancelRequested => sig.cancel.cancel(),
                        LeaseStatus::Lost => sig.lost.cancel(),
                    }
                }
            }
            // A database blip: try again next tick; the lease has slack for two misses.
            Err(e) => tracing::warn!(error = %e, jobs = jobs.len(), "could not extend leases"),
        }
    }
}

async fn backend(ctx: &Ctx, id: Uuid) -> Result<Arc<CachedBackend>, BackendError> {
    if let Some((at, b)) = ctx.backends.read().await.get(&id)
        && at.elapsed() < BACKEND_CACHE_TTL
    {
        return Ok(b.clone());
    }
    let fetched = Box::pin(db::backend_by_id(&ctx.pool, id))
        .await
        .map_err(|e| BackendError::Unreachable(format!("could not read backend {id}: {e}")))?;
    let Some(b) = fetched else {
        ctx.backends.write().await.remove(&id);
        return Err(BackendError::Rejected {
            status: 404,
            message: format!("backend {id} no longer exists"),
        });
    };
    let mut cache = ctx.backends.write().await;
    let kept = cache.get(&id);
    // The jobs of a claim miss together: the first to get here stores the entry, and the
    // others take it, so that their pins meet in one gatherer.
    if let Some((at, kept)) = kept
        && at.elapsed() < BACKEND_CACHE_TTL
    {
        return Ok(kept.clone());
    }
    // A backend read again at the same URL keeps its gatherer.
    let pins = match kept {
        Some((_, kept)) if kept.backend.url == b.url => kept.pins.clone(),
        _ => Arc::new(PinGroups::start(
            KuboClient::new(ctx.http.clone(), &b.url),
            ctx.args.pin_group,
            ctx.args.concurrency,
            Duration::from_secs(ctx.args.pin_timeout_secs.max(1)),
        )),
    };
    let b = Arc::new(CachedBackend { pins, backend: b });
    let now = tokio::time::Instant::now();
    cache.retain(|_, (at, _)| now.duration_since(*at) < BACKEND_CACHE_IDLE);
    cache.insert(id, (now, b.clone()));
    Ok(b)
}

/// Runs the job's operation on its backend.
async fn execute(
    job: &ClaimedJob,
    backend: Result<Arc<CachedBackend>, BackendError>,
) -> Result<(), BackendError> {
    // An unpin takes away this owner's reference; the node unpins only what no other
    // owner (or nobody in pinq) still holds.
    if !job.calls_node() {
        tracing::debug!(job_id = %job.id, cid = %job.cid, "others still hold this pin; only this owner's reference is removed");
        return Ok(());
    }
    let cached = backend?;
    if !cached.backend.enabled {
        return Err(BackendError::Transient {
            status: 503,
            message: format!("backend '{}' is disabled", cached.backend.name),
        });
    }
    let op: Op = job.op.parse().map_err(|_| BackendError::Rejected {
        status: 400,
        message: format!("unknown op '{}'", job.op),
    })?;
    if op != Op::Unpin {
        cached.pins.pin_add(&job.cid).await?;
    }
    match job.removes() {
        Some(old) if job.unpins_on_node() => cached.pins.pin_rm(old).await,
        Some(old) => {
            tracing::debug!(job_id = %job.id, cid = %old, "others still hold the replaced pin; only this owner's reference is removed");
            Ok(())
        }
        None => Ok(()),
    }
}

/// Records the worker's heartbeat until it is aborted, which is after the drain: a worker
/// draining its jobs is `stopping`, and keeps beating, so the scheduler does not take it
/// for lost and hand its running jobs to others while the grace period lets them finish.
async fn heartbeat_loop(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(ctx.args.heartbeat_secs.max(1)));
    let mut stopping = false;
    loop {
        tokio::select! {
            // At once when the drain starts, then on the tick.
            _ = shutdown.cancelled(), if !stopping => stopping = true,
            _ = tick.tick() => {}
        }
        let state = if stopping { "stopping" } else { "running" };
        let n = ctx.in_flight.load(Ordering::Relaxed);
        if let Err(e) = db::heartbeat(&ctx.pool, ctx.id, n, state).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
