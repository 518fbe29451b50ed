//! pinq-scheduler: pinq's clock.
//!
//! Its relay keeps the broker in step with PostgreSQL: it publishes jobs the API
//! committed but never got confirmed by the broker, retries whose `retry_at` has come, and
//! jobs whose claim's lease expired (the worker is presumed dead), and publishes again the
//! jobs of messages published long ago that never started. Each pass locks its rows with
//! `FOR UPDATE SKIP LOCKED`, so any number of schedulers can run side by side.

mod cron;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use pinq_core::amqp::Publisher;
use pinq_core::config::{LogArgs, SchedulerArgs, ServiceArgs};
use pinq_core::db::{self, RelayScan};
use pinq_core::model::Priority;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Command-line and environment settings of `pinq-scheduler`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pinq-scheduler",
    version,
    about = "pinq scheduler: relay and periodic tasks"
)]
pub struct Args {
    #[command(flatten)]
    pub services: ServiceArgs,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Runs until `shutdown` is cancelled; a pass under way is finished first.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A lazy pool: the scheduler starts while PostgreSQL is down and keeps retrying.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.services.db_max_connections.clamp(1, 4))
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&args.services.database_url)?;
    let publisher = Arc::new(Publisher::new(
        &args.services.amqp_url,
        &args.services.queue,
        args.services.urgent_priority,
        args.services.message_jobs,
    ));
    tracing::info!(queue = %args.services.queue, "pinq-scheduler started");
    println!("pinq-scheduler started");
    let relay = Relay::new(pool.clone(), publisher.clone(), args.scheduler.clone());
    // The cron loop runs beside the relay; both finish their current pass on shutdown.
    let cron = Arc::new(cron::CronLoop::new(pool.clone(), args.scheduler.clone()));
    let cron_task = tokio::spawn(cron.run(shutdown.clone()));
    relay.run(shutdown).await;
    if let Err(e) = cron_task.await {
        tracing::error!(error = %e, "cron loop panicked");
    }
    publisher.close().await;
    pool.close().await;
    tracing::info!("pinq-scheduler stopped");
    Ok(())
}

/// The relay/dispatcher loop.
pub struct Relay {
    pub pool: PgPool,
    pub publisher: Arc<Publisher>,
    pub settings: SchedulerArgs,
    /// Where the next page of the unblocked scan starts (see [`RelayScan::Unblocked`]).
    unblocked_after: std::sync::Mutex<Uuid>,
    /// When the job tallies were last folded (see [`db::fold_job_tallies`]).
    folded_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Relay {
    pub fn new(pool: PgPool, publisher: Arc<Publisher>, settings: SchedulerArgs) -> Relay {
        Relay {
            pool,
            publisher,
            settings,
            unblocked_after: std::sync::Mutex::new(Uuid::nil()),
            folded_at: std::sync::Mutex::new(None),
        }
    }

    pub async fn run(&self, shutdown: CancellationToken) {
        let idle = Duration::from_millis(self.settings.relay_interval_ms.max(10));
        let mut backoff = failure_backoff();
        while !shutdown.is_cancelled() {
            let pause = match self.pass().await {
                // A full batch means more is probably waiting: go again at once.
                Ok(n) if n >= self.settings.relay_batch as usize => Duration::ZERO,
                Ok(_) => {
                    backoff = failure_backoff();
                    idle
                }
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "relay pass failed");
                    wait
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// One pass: reap silent workers, move the jobs of expired leases, due retries and
    /// parked jobs no longer blocked back to `queued` (each scan owing their messages in
    /// the dispatch outbox), owe again the jobs of long-published entries that never
    /// started, fold the job tallies once a minute, then publish what the outbox holds.
    /// Returns the most rows any one step handled.
    pub async fn pass(&self) -> anyhow::Result<usize> {
        let stale = Duration::from_secs(self.settings.worker_stale_secs.max(1));
        let (lost, claims) = db::reap_lost_workers(&self.pool, stale).await?;
        if lost > 0 {
            tracing::warn!(
                workers = lost,
                claims,
                "workers stopped heartbeating; marked lost and their leases expired"
            );
        }
        let mut most = 0;
        // One page of parked jobs a pass: each pass costs the same however many are
        // parked, and a job whose blocker has ended waits at most one pass per page.
        let after = *self
            .unblocked_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for scan in [
            RelayScan::ExpiredLeases,
            RelayScan::DueRetries,
            RelayScan::Unblocked { after },
        ] {
            most = most.max(self.requeue(scan).await?);
        }
        most = most.max(self.reowe_stale().await?);
        // The fold only keeps two small tables small: its failure must not hold up the
        // publish, so it is logged and tried again next pass.
        if let Err(e) = self.fold_tallies().await {
            tracing::warn!(error = format!("{e:#}"), "folding the job tallies failed");
        }
        Ok(most.max(self.publish_owed().await?))
    }

    /// Once every [`FOLD_EVERY`]: folds the job tallies of database sessions that have
    /// ended and deletes old per-second finishes, which keeps both tables small. Counts
    /// do not depend on it: `GET /v1/stats` sums every session's rows.
    async fn fold_tallies(&self) -> anyhow::Result<()> {
        let now = tokio::time::Instant::now();
        {
            // Due or not, and taken for this minute before it runs: a fold that fails is
            // tried again a minute later, not on every pass.
            let mut at = self
                .folded_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if at.is_some_and(|at| now.duration_since(at) < FOLD_EVERY) {
                return Ok(());
            }
            *at = Some(now);
        }
        let folded = db::fold_job_tallies(&self.pool).await?;
        tracing::debug!(rows = folded, "folded the job tallies of ended sessions");
        Ok(())
    }

    /// The safety net for messages lost in the broker: see [`db::relay_reowe_stale`].
    async fn reowe_stale(&self) -> anyhow::Result<usize> {
        let after = Duration::from_secs(self.settings.redispatch_after_secs.max(1));
        let mut tx = self.pool.begin().await?;
        let (checked, owed) =
            db::relay_reowe_stale(&mut tx, after, self.settings.relay_batch).await?;
        tx.commit().await?;
        if owed > 0 {
            tracing::warn!(
                jobs = owed,
                "queued jobs never started long after their message was published; publishing them again"
            );
        }
        Ok(checked)
    }

    /// Moves one scan's jobs back to `queued` and owes their messages, in one transaction
    /// committed before anything is published: a claim never waits on a row whose committed
    /// state does not match, so a message published before that commit could reach a
    /// worker that still sees `retry_wait` or `running` and drops it.
    async fn requeue(&self, scan: RelayScan) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let take = db::relay_lock_due(&mut tx, scan, self.settings.relay_batch).await?;
        if take.jobs.is_empty() {
            // Expired claims whose jobs had all finished are deleted all the same.
            tx.commit().await?;
            self.page_done(scan, &take);
            return Ok(take.taken);
        }
        let ids: Vec<Uuid> = take.jobs.iter().map(|j| j.id).collect();
        let cancelled = db::relay_requeue(&mut tx, scan, &ids).await?;
        tx.commit().await?;
        self.page_done(scan, &take);
        let jobs = ids.len() - cancelled;
        if cancelled > 0 {
            tracing::info!(
                jobs = cancelled,
                "ended jobs cancelled: their cancel was requested before their worker was lost"
            );
        }
        match scan {
            _ if jobs == 0 => {}
            RelayScan::ExpiredLeases => {
                tracing::warn!(jobs, "requeued jobs whose lease expired")
            }
            RelayScan::DueRetries => tracing::info!(jobs, "requeued due retries"),
            RelayScan::Unblocked { .. } => tracing::info!(
                jobs,
                "requeued jobs whose earlier job on the same CID has ended"
            ),
        }
        Ok(take.taken)
    }

    /// After an unblocked scan's page has committed, the next pass reads the next page (or
    /// the first, after the last). A page whose transaction failed is read again.
    fn page_done(&self, scan: RelayScan, take: &db::RelayTake) {
        if let RelayScan::Unblocked { .. } = scan {
            let mut after = self
                .unblocked_after
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *after = take.resume_after.unwrap_or_else(Uuid::nil);
        }
    }

    /// Publishes the dispatch outbox's due entries with confirms and deletes them, in one
    /// transaction holding the entries locked (so two relays never publish one entry at
    /// once). If the publish fails, the entries stay for the next pass.
    async fn publish_owed(&self) -> anyhow::Result<usize> {
        let grace = Duration::from_millis(self.settings.relay_grace_ms);
        let mut tx = self.pool.begin().await?;
        let (entries, due) = db::relay_take_owed(&mut tx, grace, OUTBOX_ENTRIES_PER_PASS).await?;
        if entries.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let jobs: Vec<(Uuid, Priority)> = due
            .iter()
            .map(|j| {
                (
                    j.id,
                    Priority::new(i64::from(j.priority)).unwrap_or_default(),
                )
            })
            .collect();
        for chunk in jobs.chunks(self.settings.relay_batch.max(1) as usize) {
            self.publisher.publish_jobs(chunk).await?;
        }
        db::relay_settle(&mut tx, &entries).await?;
        tx.commit().await?;
        if !jobs.is_empty() {
            tracing::info!(
                jobs = jobs.len(),
                entries = entries.len(),
                "published owed jobs"
            );
        }
        // A full take means more is probably waiting: report it as a full pass.
        Ok(if entries.len() as i64 >= OUTBOX_ENTRIES_PER_PASS {
            self.settings.relay_batch.max(1) as usize
        } else {
            jobs.len()
        })
    }
}

/// How often the relay folds the job tallies (see [`Relay::fold_tallies`]).
const FOLD_EVERY: Duration = Duration::from_secs(60);

/// Most dispatch-outbox entries one relay transaction publishes (an entry names one
/// requeue, one batch or one hand-back).
const OUTBOX_ENTRIES_PER_PASS: i64 = 64;

fn failure_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
