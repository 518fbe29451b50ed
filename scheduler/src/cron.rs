//! The cron loop: every tick it claims the due firings of the schedules in PostgreSQL
//! (and manual runs asked for through the API) and runs their tasks.
//!
//! Claims go through [`pinq_core::schedule::claim_due`], which inserts each firing under
//! the unique key `(schedule, fire_time)`; whichever replica's insert wins runs it, so any
//! number of schedulers can run side by side. A runner heartbeats its running firings; a
//! firing whose runner died is reaped as failed, and its schedule fires again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use pinq_core::config::SchedulerArgs;
use pinq_core::schedule::{self, Claimed, RUN_HEARTBEAT_STALE};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::tasks::{self, TaskCtx};

/// How often running firings are heartbeated and abandoned ones reaped.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

pub struct CronLoop {
    pub pool: PgPool,
    pub settings: SchedulerArgs,
    /// This process, as the `runner` of the firings it claims.
    pub runner: Uuid,
    pub http: reqwest::Client,
    /// Firings this process is running now (heartbeated until they finish).
    inflight: Mutex<HashSet<i64>>,
}

impl CronLoop {
    pub fn new(pool: PgPool, settings: SchedulerArgs) -> Self {
        CronLoop {
            pool,
            settings,
            runner: Uuid::new_v4(),
            http: pinq_core::kubo::KuboClient::http_client(),
            inflight: Mutex::new(HashSet::new()),
        }
    }

    /// Runs until `shutdown` is cancelled. The pass under way is finished; running tasks
    /// get the shutdown grace period to end, and are recorded as failed if they do not.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(runner = %self.runner, "cron loop started");
        let tick = Duration::from_millis(self.settings.cron_tick_ms.max(20));
        let tracker = TaskTracker::new();
        let mut backoff = failure_backoff();
        let mut last_housekeeping: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            let pause = match self.pass(&tracker, &shutdown, &mut last_housekeeping).await {
                Ok(()) => {
                    backoff = failure_backoff();
                    tick
                }
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "cron pass failed");
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        tracker.close();
        let grace = Duration::from_secs(self.settings.cron_shutdown_grace_secs);
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        let wait = tracker.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = &mut deadline => {
                    let n = schedule::fail_own_running(&self.pool, self.runner, "interrupted: the scheduler stopped")
                        .await
                        .unwrap_or(0);
                    tracing::warn!(runs = n, "schedule runs still going at shutdown were recorded as failed");
                    break;
                }
                _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {
                    let _ = schedule::heartbeat(&self.pool, self.runner, &self.inflight_ids()).await;
                }
            }
        }
        tracing::info!("cron loop stopped");
    }

    async fn pass(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        last_housekeeping: &mut Option<Instant>,
    ) -> anyhow::Result<()> {
        if last_housekeeping.is_none_or(|t| t.elapsed() >= HOUSEKEEPING_EVERY) {
            schedule::heartbeat(&self.pool, self.runner, &self.inflight_ids()).await?;
            let reaped = schedule::reap_abandoned(&self.pool, RUN_HEARTBEAT_STALE).await?;
            if reaped > 0 {
                tracing::warn!(
                    runs = reaped,
                    "recorded schedule runs abandoned by a stopped scheduler as failed"
                );
            }
            *last_housekeeping = Some(Instant::now());
        }
        let mut claimed = schedule::claim_due(&self.pool, self.runner).await?;
        claimed.extend(schedule::claim_manual(&self.pool, self.runner, 8).await?);
        for c in claimed {
            if let Ok(mut set) = self.inflight.lock() {
                set.insert(c.run_id);
            }
            let me = Arc::clone(self);
            let stop = shutdown.clone();
            tracker.spawn(async move { me.execute(c, stop).await });
        }
        Ok(())
    }

    fn inflight_ids(&self) -> Vec<i64> {
        self.inflight
            .lock()
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default()
    }

    async fn execute(&self, c: Claimed, shutdown: CancellationToken) {
        self.execute_inner(&c, shutdown).await;
        if let Ok(mut set) = self.inflight.lock() {
            set.remove(&c.run_id);
        }
    }

    async fn execute_inner(&self, c: &Claimed, shutdown: CancellationToken) {
        tracing::info!(schedule = %c.schedule, task = %c.task, fire_time = %c.fire_time, manual = c.manual, run_id = c.run_id, "schedule firing");
        let started = Instant::now();
        let ctx = TaskCtx {
            pool: self.pool.clone(),
            settings: self.settings.clone(),
            http: self.http.clone(),
            run_id: c.run_id,
            shutdown,
        };
        let outcome = tasks::run(&ctx, &c.task, &c.args).await;
        let elapsed = started.elapsed();
        match &outcome.error {
            None => {
                tracing::info!(schedule = %c.schedule, run_id = c.run_id, elapsed_ms = elapsed.as_millis() as u64, output = %outcome.output, "schedule run succeeded")
            }
            Some(e) => {
                tracing::warn!(schedule = %c.schedule, run_id = c.run_id, elapsed_ms = elapsed.as_millis() as u64, error = %e, "schedule run failed")
            }
        }
        // PostgreSQL may be briefly away: keep trying to record the outcome for a while.
        let mut backoff = failure_backoff();
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            match schedule::finish(
                &self.pool,
                c.run_id,
                self.runner,
                &outcome.output,
                outcome.error.as_deref(),
            )
            .await
            {
                Ok(true) => break,
                Ok(false) => {
                    tracing::warn!(
                        run_id = c.run_id,
                        "schedule run was reaped before it finished; outcome not recorded"
                    );
                    break;
                }
                Err(e) if Instant::now() < give_up => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(run_id = c.run_id, error = %e, retry_in = ?wait, "could not record a schedule run's outcome");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::error!(run_id = c.run_id, error = %e, "gave up recording a schedule run's outcome; it will be reaped as abandoned");
                    break;
                }
            }
        }
    }
}

fn failure_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
