//! The full-stack benchmark of issue 7 (by hand, not in CI). The one command is
//!
//!     bench/run.sh                       # builds, starts the services, runs everything
//!     cargo run --release -p pinq-e2e --example bench -- --scenario all --json out.json
//!
//! Each scenario builds its own stack with the end-to-end harness: a fresh database, a
//! unique queue, and the release binaries (`pinq-api`, `pinq-worker`, `pinq-scheduler`)
//! as child processes. It only talks to pinq through the HTTP API, reads PostgreSQL
//! directly for job states and timestamps, and reads `/proc` for memory, so it measures
//! whatever the worker does inside. Scenarios:
//!
//! - `ingest`: ops/s accepted by `POST /v1/batches` (10,000-op batches, several clients),
//!   with no worker running;
//! - `e2e`: jobs/s from the first submit to the last `succeeded` for 100,000 pin jobs,
//!   with one and with two worker processes;
//! - `latency`: submit→done latency at a steady offered load (1,000 jobs/s);
//! - `priority`: how soon a priority-9 batch starts behind 100,000 queued priority-1 jobs;
//! - `inflight`: the worker's memory with 512 pins in flight;
//! - `realnode`: pins/s through pinq on a real js-ipfs node, beside a plain client;
//! - `index`: the scheduler's index update on a backend with 100,000 pins in pinq's index
//!   (1 % of them lost by the node, which also holds 1 % more that pinq does not know):
//!   how long a run takes, the WAL it writes, the pin rows it rewrites;
//! - `pgonly`: pinq's own PostgreSQL statements alone (stored, claimed and succeeded
//!   without the API, the worker, RabbitMQ or a backend): what they cost a job.
//!
//! Every scenario but `realnode` uses a TEST DOUBLE of the Kubo RPC (instant backend),
//! for load and fault injection only (`pinq_e2e::kubo_double`): a real node cannot
//! answer 25,000 pins a second, and the point is to measure pinq, not IPFS. Every figure
//! from the double is labelled so. Memory figures are each process's peak resident set
//! (`VmHWM`). Only 127.0.0.1 is contacted; every loop is bounded in count and time.

mod pgonly;
mod report;
mod rss;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use pinq_core::kubo::KuboClient;
use pinq_e2e::kubo_double::{self, DoubleConfig, KuboDouble, Latency};
use pinq_e2e::{Stack, TOKEN, unique_contents};
use report::Metric;
use rss::RssWatch;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, Parser)]
#[command(about = "pinq's full-stack throughput and latency benchmark (issue 7)")]
struct Opts {
    /// all, or one of: ingest, e2e, latency, priority, inflight, realnode, index, pgonly
    /// (comma-separated).
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Pin jobs in the end-to-end run and in the priority scenario's backlog.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Operations per batch for the bulk submits.
    #[arg(long, default_value_t = 10_000)]
    batch_ops: usize,
    /// Concurrent clients submitting batches.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Batches each client sends in the ingest run.
    #[arg(long, default_value_t = 5)]
    ingest_batches: usize,
    /// Worker process counts to run the end-to-end scenario with.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    e2e_workers: Vec<usize>,
    /// PINQ_WORKER_CONCURRENCY for the throughput and latency runs.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Offered load of the latency run, in jobs/s (sent as a batch every 10 ms).
    #[arg(long, default_value_t = 1000)]
    rate: usize,
    /// How long the latency run offers its load and measures.
    #[arg(long, default_value_t = 15)]
    latency_secs: u64,
    /// How long the latency run offers its load first without measuring it: the stack
    /// opens its database connections and prepares its statements (reported apart).
    #[arg(long, default_value_t = 2)]
    latency_warmup_secs: u64,
    /// The double's latency range in the priority scenario, e.g. "20-40" ms.
    #[arg(long, default_value = "20-40")]
    priority_double_ms: String,
    /// PINQ_WORKER_CONCURRENCY in the priority scenario (small, so the backlog lasts).
    #[arg(long, default_value_t = 64)]
    priority_concurrency: usize,
    /// Jobs in the priority-9 batch.
    #[arg(long, default_value_t = 100)]
    priority_batch: usize,
    /// Pins in flight for the worker-memory scenario.
    #[arg(long, default_value_t = 512)]
    inflight: usize,
    /// Contents pinned in each run of the real-node scenario.
    #[arg(long, default_value_t = 2000)]
    node_pins: usize,
    /// Runs of each client in the real-node scenario (they take turns; direct runs once more)
    #[arg(long, default_value_t = 3)]
    node_rounds: usize,
    /// Concurrency of both pinq's worker and the direct client in the real-node scenario.
    #[arg(long, default_value_t = 32)]
    node_concurrency: usize,
    /// Diagnostic: a share of one core (0–1) that a busy thread of the bench takes during
    /// each counted direct run of the real-node scenario, to show what the same client
    /// loses when something else shares the machine with the node (0 for the bench).
    #[arg(long, default_value_t = 0.0)]
    direct_beside_load: f64,
    /// Pins on the backend, all in pinq's index, in the index-update scenario.
    #[arg(long, default_value_t = 100_000)]
    index_pins: usize,
    /// Runs of the index update in the index-update scenario (one after the other).
    #[arg(long, default_value_t = 2)]
    index_runs: usize,
    /// Error rate the double injects on pin/add (fault-injection runs; 0 for the bench).
    #[arg(long, default_value_t = 0.0)]
    double_error_rate: f64,
    /// Jobs a statement in the `pgonly` scenario's claims and successes (a message's jobs).
    #[arg(long, default_value_t = 128)]
    pg_group: usize,
    /// Diagnostic: SQL run on the `pgonly` scenario's database after its migrations
    /// (repeatable), for A/B runs of a schema change, e.g.
    /// `--pg-sql 'ALTER TABLE jobs DISABLE TRIGGER USER'`.
    #[arg(long = "pg-sql", value_name = "SQL")]
    pg_sql: Vec<String>,
    /// PINQ_DB_MAX_CONNECTIONS of every process.
    #[arg(long, default_value_t = 16)]
    db_connections: u32,
    /// PINQ_PIN_GROUP of the workers (most pins in one shared pin/add call; 1: one call
    /// per pin). Unset: the worker's default.
    #[arg(long)]
    pin_group: Option<usize>,
    /// Diagnostic: a setting given to every pinq process of every stack, as `NAME=value`
    /// (repeatable), for A/B runs of a setting the bench has no flag for, e.g.
    /// `--env PINQ_MESSAGE_JOBS=128`. Applied after the bench's own settings.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_setting)]
    env: Vec<(String, String)>,
    /// RUST_LOG of the processes (`info` writes a log line per job).
    #[arg(long, default_value = "warn")]
    log: String,
    /// Upper bound on any one wait (a scenario that does not finish in time is reported
    /// with what it reached and marked as a miss).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Give up waiting when no job has finished for this long (reported as a miss).
    #[arg(long, default_value_t = 60)]
    stall_secs: u64,
    /// Write the JSON report here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

impl Opts {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    fn stall(&self) -> Duration {
        Duration::from_secs(self.stall_secs)
    }

    fn runs(&self, name: &str) -> bool {
        self.scenario
            .split(',')
            .any(|s| s.trim() == "all" || s.trim() == name)
    }
}

const SCENARIOS: [&str; 8] = [
    "ingest", "e2e", "latency", "priority", "inflight", "realnode", "index", "pgonly",
];

// ---------------------------------------------------------------------------------------
// Stacks and submits

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A pinq stack for one scenario, with the TEST DOUBLE registered as backend `double`.
struct BenchStack {
    stack: Stack,
    double: Option<KuboDouble>,
    salt: u64,
}

impl BenchStack {
    async fn start(
        opts: &Opts,
        workers: usize,
        concurrency: usize,
        double: Option<DoubleConfig>,
    ) -> anyhow::Result<BenchStack> {
        let mut stack = Stack::new().await?;
        let c = concurrency.to_string();
        stack.env = vec![
            ("RUST_LOG".into(), opts.log.clone()),
            // The production defaults. The relay is off the fast path (the API publishes
            // what it commits), so polling it faster only takes CPU from the run; the API's
            // own publish gets 3 s before the relay steps in, so a fast run is not doubled
            // by relay publishes.
            ("PINQ_RELAY_INTERVAL_MS".into(), "500".into()),
            ("PINQ_RELAY_GRACE_MS".into(), "3000".into()),
            (
                "PINQ_DB_MAX_CONNECTIONS".into(),
                opts.db_connections.to_string(),
            ),
            ("PINQ_WORKER_CONCURRENCY".into(), c),
            ("PINQ_PIN_TIMEOUT_SECS".into(), "60".into()),
            ("PINQ_MAX_BODY_BYTES".into(), (64 * 1024 * 1024).to_string()),
        ];
        stack.env.extend(extra_env(opts));
        stack.start_api().await?;
        let double = match double {
            Some(config) => {
                let d = KuboDouble::start(config).await?;
                stack.register_backend("double", &d.url).await?;
                Some(d)
            }
            None => None,
        };
        stack.start_scheduler()?;
        let mut s = BenchStack {
            stack,
            double,
            salt: rand::random(),
        };
        s.add_workers(workers).await?;
        Ok(s)
    }

    /// Starts `n` more workers and waits until they have registered.
    async fn add_workers(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            self.stack.start_worker()?;
        }
        let want = self.stack.workers.len() as i64;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (count,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM workers WHERE state = 'running'")
                    .fetch_one(&self.stack.db.pool)
                    .await?;
            if count >= want || want == 0 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{count} of {want} workers registered within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Registration comes just before the consumer opens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    fn pool(&self) -> &PgPool {
        &self.stack.db.pool
    }

    fn submitter(&self) -> Submitter {
        Submitter {
            http: self.stack.http.clone(),
            url: format!("{}/v1/batches", self.stack.api_url),
        }
    }

    /// The labelled processes, for memory sampling.
    fn procs(&self) -> Vec<(String, i32)> {
        let mut v = Vec::new();
        if let Some(p) = &self.stack.api {
            v.push(("api".to_owned(), p.pid()));
        }
        for p in &self.stack.workers {
            v.push((p.label.clone(), p.pid()));
        }
        if let Some(p) = &self.stack.scheduler {
            v.push(("scheduler".to_owned(), p.pid()));
        }
        v
    }

    /// Request bodies for `jobs` pin jobs of CIDs `from..from+jobs` of this stack's series,
    /// `per_batch` ops each, serialized before any timing starts.
    fn bodies(&self, from: usize, jobs: usize, per_batch: usize, priority: u8) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = from;
        while i < from + jobs {
            let end = (i + per_batch.max(1)).min(from + jobs);
            let cids: Vec<String> = (i..end)
                .map(|k| kubo_double::synthetic_cid(self.salt, k as u64))
                .collect();
            out.push(pin_body(&cids, priority, "double"));
            i = end;
        }
        out
    }

    fn double_counters(&self) -> Value {
        self.double
            .as_ref()
            .map(|d| d.counters().snapshot())
            .unwrap_or(Value::Null)
    }
}

fn pin_body(cids: &[String], priority: u8, backend: &str) -> Vec<u8> {
    let ops: Vec<Value> = cids
        .iter()
        .map(|c| json!({"op": "pin", "cid": c}))
        .collect();
    json!({"priority": priority, "backends": [backend], "ops": ops})
        .to_string()
        .into_bytes()
}

/// Sends pre-serialized batches to `POST /v1/batches`.
#[derive(Clone)]
struct Submitter {
    http: reqwest::Client,
    url: String,
}

/// One accepted batch: its id, when it was sent (Unix seconds) and how long the 202 took.
#[derive(Debug, Clone, Copy)]
struct Sent {
    id: Uuid,
    sent_unix: f64,
    took: Duration,
}

impl Submitter {
    async fn send(&self, body: Vec<u8>) -> anyhow::Result<Sent> {
        let sent_unix = unix_now();
        let t = Instant::now();
        let resp = self
            .http
            .post(&self.url)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        let took = t.elapsed();
        anyhow::ensure!(
            status == 202,
            "batch not accepted: {status} {}",
            &text[..text.len().min(300)]
        );
        let v: Value = serde_json::from_str(&text)?;
        let id = v["id"].as_str().context("202 without id")?.parse()?;
        Ok(Sent {
            id,
            sent_unix,
            took,
        })
    }

    /// Sends `bodies` from `clients` concurrent clients (round-robin), each one batch at a
    /// time. Returns the accepted batches and the wall time from first send to last 202.
    async fn send_all(
        &self,
        bodies: Vec<Vec<u8>>,
        clients: usize,
    ) -> anyhow::Result<(Vec<Sent>, Duration)> {
        let clients = clients.max(1);
        let mut per_client: Vec<Vec<Vec<u8>>> = vec![Vec::new(); clients];
        for (i, b) in bodies.into_iter().enumerate() {
            per_client[i % clients].push(b);
        }
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for bodies in per_client {
            let s = self.clone();
            tasks.push(tokio::spawn(async move {
                let mut sent = Vec::new();
                for b in bodies {
                    sent.push(s.send(b).await?);
                }
                anyhow::Ok(sent)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        Ok((all, t0.elapsed()))
    }
}

fn ids(sent: &[Sent]) -> Vec<Uuid> {
    sent.iter().map(|s| s.id).collect()
}

/// Job counts of some batches, read from PostgreSQL: succeeded, finished, and the
/// dispatch-outbox entries still owed to the broker (each stack has a database of its own,
/// so every entry is this run's).
async fn counts(pool: &PgPool, batches: &[Uuid]) -> anyhow::Result<(i64, i64, i64)> {
    let row: (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'),
                count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'cancelled')),
                (SELECT count(*) FROM dispatch_outbox WHERE published_at IS NULL)
         FROM jobs WHERE batch_id = ANY($1)",
    )
    .bind(batches)
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// How a wait for jobs to finish ended.
#[derive(Debug)]
struct Drained {
    succeeded: i64,
    finished: i64,
    /// From the wait's start until every job had finished (or the timeout).
    elapsed: Duration,
    complete: bool,
    polls: u32,
    mean_poll_ms: f64,
}

/// What [`wait_finished`] counts at each poll.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Poll {
    /// The unfinished jobs of the batches waited for: a scan of their jobs each time.
    Batches,
    /// The unfinished jobs of the whole database, from the job counts pinq's triggers keep
    /// (`job_tallies`, a few rows whatever the jobs): for a stack whose every unfinished
    /// job belongs to the batches waited for. The end is then confirmed by [`Poll::Batches`]
    /// once. A scan of 100,000 jobs every 500 ms took about 90 ms of PostgreSQL a time,
    /// some 13 µs a job of the end-to-end run on a core the run needs.
    Tallies,
}

/// Polls PostgreSQL every `every` until `total` jobs of `batches` have finished, or
/// until the timeout, or until nothing has finished for the stall time.
async fn wait_finished(
    pool: &PgPool,
    batches: &[Uuid],
    total: i64,
    since: Instant,
    every: Duration,
    poll: Poll,
    opts: &Opts,
) -> anyhow::Result<Drained> {
    let mut polls = 0u32;
    let mut poll_time = Duration::ZERO;
    let (mut last_finished, mut last_change) = (-1, Instant::now());
    let mut how = poll;
    loop {
        let t = Instant::now();
        let unfinished: i64 = if how == Poll::Tallies {
            let (n,): (Option<i64>,) = sqlx::query_as(
                "SELECT sum(n)::int8 FROM job_tallies
                 WHERE state IN ('queued', 'running', 'retry_wait')",
            )
            .fetch_one(pool)
            .await?;
            n.unwrap_or(0)
        } else {
            // The poll counts what is left, not what is done: its cost shrinks as the run
            // progresses instead of growing, so it disturbs the figures less. (Every batch
            // passed in was accepted, so all its jobs are stored.)
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM jobs
                 WHERE batch_id = ANY($1) AND state IN ('queued', 'running', 'retry_wait')",
            )
            .bind(batches)
            .fetch_one(pool)
            .await?;
            n
        };
        polls += 1;
        poll_time += t.elapsed();
        let finished = total - unfinished;
        if finished != last_finished {
            (last_finished, last_change) = (finished, Instant::now());
        }
        let complete = finished >= total;
        if complete && how == Poll::Tallies {
            // The end, confirmed by the batches' own jobs at once.
            how = Poll::Batches;
            continue;
        }
        let stalled = last_change.elapsed() > opts.stall();
        let timed_out = since.elapsed() > opts.timeout();
        if (stalled || timed_out) && how == Poll::Tallies {
            // The tallies also count unfinished jobs of other batches, if any: what these
            // batches reached is told by their own jobs.
            how = Poll::Batches;
            continue;
        }
        if stalled {
            eprintln!(
                "no job finished for {} s ({finished} of {total} finished); giving up",
                opts.stall_secs
            );
        }
        if complete || stalled || timed_out {
            let elapsed = since.elapsed();
            let (succeeded, finished, _) = counts(pool, batches).await?;
            return Ok(Drained {
                succeeded,
                finished,
                elapsed,
                complete,
                polls,
                mean_poll_ms: poll_time.as_secs_f64() * 1000.0 / f64::from(polls),
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// Where the time went, from the jobs' own timestamps (all relative to `t0_unix`, the
/// client's first send, in seconds; PostgreSQL and the client share this machine's clock).
async fn phases(pool: &PgPool, batches: &[Uuid], t0_unix: f64) -> anyhow::Result<Value> {
    let (row,): (Vec<Option<f64>>,) = sqlx::query_as(
        "SELECT ARRAY[extract(epoch FROM min(created_at))::float8 - $2,
                      extract(epoch FROM max(created_at))::float8 - $2,
                      extract(epoch FROM min(started_at))::float8 - $2,
                      extract(epoch FROM min(finished_at))::float8 - $2,
                      extract(epoch FROM max(finished_at))::float8 - $2]
         FROM jobs WHERE batch_id = ANY($1)",
    )
    .bind(batches)
    .bind(t0_unix)
    .fetch_one(pool)
    .await?;
    let names = [
        "first_commit_s",
        "last_commit_s",
        "first_started_s",
        "first_finished_s",
        "last_finished_s",
    ];
    let out: serde_json::Map<String, Value> = names
        .iter()
        .zip(row)
        .map(|(k, v)| {
            (
                k.to_string(),
                json!(v.map(|x| (x * 1000.0).round() / 1000.0)),
            )
        })
        .collect();
    Ok(Value::Object(out))
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A scenario's figures and its details for the JSON report.
struct Outcome {
    metrics: Vec<Metric>,
    details: Value,
}

const DOUBLE_NOTE: &str =
    "backend: TEST DOUBLE of the Kubo RPC (instant backend), for load and fault injection only";

// ---------------------------------------------------------------------------------------
// Scenarios

/// Ingest: batches accepted per second with no worker running.
async fn ingest(opts: &Opts) -> anyhow::Result<Outcome> {
    let s = BenchStack::start(opts, 0, opts.concurrency, Some(DoubleConfig::default())).await?;
    let n_batches = opts.clients * opts.ingest_batches;
    let bodies = s.bodies(0, n_batches * opts.batch_ops, opts.batch_ops, 1);
    let body_mib = bodies.iter().map(Vec::len).sum::<usize>() as f64 / (1024.0 * 1024.0);
    let watch = RssWatch::start(s.procs());
    // Who used the CPU, and the WAL PostgreSQL wrote, from the first send until every job
    // is dispatched.
    let api_pid = s
        .procs()
        .iter()
        .find(|(l, _)| l == "api")
        .map_or(0, |p| p.1);
    let cpu0 = rss::CpuMark::read(api_pid);
    let wal0 = wal_lsn(s.pool()).await?;
    let t0 = Instant::now();
    let (sent, wall) = s.submitter().send_all(bodies, opts.clients).await?;
    let total = (n_batches * opts.batch_ops) as f64;
    let ops_s = total / wall.as_secs_f64();
    let api_peak_ingest = watch.peak_mib("api");
    // Not part of the figure: how long the API's background publish takes to catch up.
    let batch_ids = ids(&sent);
    let mut dispatched = None;
    while t0.elapsed() < opts.timeout() {
        if counts(s.pool(), &batch_ids).await?.2 == 0 {
            dispatched = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu1 = rss::CpuMark::read(api_pid);
    // The API is the mark's own process; `pinq` among the programs is the scheduler.
    let api_cpu_s = ((cpu1.process_s - cpu0.process_s) * 100.0).round() / 100.0;
    let cpu = cpu0.by_program(&cpu1);
    let wal_bytes = wal_since(s.pool(), &wal0).await?;
    let mut took: Vec<f64> = sent.iter().map(|x| x.took.as_secs_f64() * 1000.0).collect();
    took.sort_by(f64::total_cmp);
    let memory = watch.finish();
    let mut metrics = vec![
        Metric::new(
            "ingest",
            &format!(
                "ops/s accepted ({} clients x {} batches x {} ops)",
                opts.clients, opts.ingest_batches, opts.batch_ops
            ),
            ops_s,
            "ops/s",
        )
        .at_least(100_000.0),
        Metric::new(
            "ingest",
            "batch 202 latency p50",
            percentile(&took, 0.5),
            "ms",
        ),
        Metric::new(
            "ingest",
            "batch 202 latency max",
            percentile(&took, 1.0),
            "ms",
        ),
        Metric::new(
            "ingest",
            "api peak RSS (VmHWM) under ingest",
            api_peak_ingest,
            "MiB",
        )
        .at_most(128.0),
    ];
    match dispatched {
        Some(d) => metrics.push(Metric::new(
            "ingest",
            "all jobs dispatched to RabbitMQ (from first send)",
            d.as_secs_f64(),
            "s",
        )),
        None => metrics.push(
            Metric::new("ingest", "all jobs dispatched to RabbitMQ", f64::NAN, "s")
                .note("not within the timeout"),
        ),
    }
    Ok(Outcome {
        metrics,
        details: json!({
            "ops": total,
            "body_mib": (body_mib * 10.0).round() / 10.0,
            "wall_s": secs(wall),
            "dispatched_s": dispatched.map(secs),
            // The whole server's WAL: nothing else writes while the bench runs.
            "wal_bytes_per_op": (wal_bytes / total).round(),
            "api_cpu_s": api_cpu_s,
            "others_cpu_by_program_s": cpu,
            "batch_202_ms": {"p50": percentile(&took, 0.5), "p90": percentile(&took, 0.9), "max": percentile(&took, 1.0)},
            "memory": memory,
            "loadavg_after": report::loadavg(),
        }),
    })
}

/// PostgreSQL's current WAL position, as text.
async fn wal_lsn(pool: &PgPool) -> anyhow::Result<String> {
    let (lsn,): (String,) = sqlx::query_as("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await?;
    Ok(lsn)
}

/// Bytes of WAL the whole server wrote since `lsn` (from [`wal_lsn`]).
async fn wal_since(pool: &PgPool, lsn: &str) -> anyhow::Result<f64> {
    let (bytes,): (f64,) =
        sqlx::query_as("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8")
            .bind(lsn)
            .fetch_one(pool)
            .await?;
    Ok(bytes)
}

/// End to end: 100,000 pin jobs from first submit to last `succeeded`.
async fn e2e(opts: &Opts, workers: usize) -> anyhow::Result<Outcome> {
    let scenario = format!("e2e/{workers}w");
    let config = DoubleConfig {
        latency: Latency::None,
        error_rate: opts.double_error_rate,
    };
    let s = BenchStack::start(opts, workers, opts.concurrency, Some(config)).await?;
    let bodies = s.bodies(0, opts.jobs, opts.batch_ops, 1);
    let watch = RssWatch::start(s.procs());
    let cpu = JobCpu::start(&s);
    let t0 = Instant::now();
    let t0_unix = unix_now();
    let (sent, submit_wall) = s.submitter().send_all(bodies, opts.clients).await?;
    let batch_ids = ids(&sent);
    // The figure comes from the jobs' own timestamps, so the poll only has to notice the
    // end: it runs rarely, to take as little of PostgreSQL as it can.
    let drained = wait_finished(
        s.pool(),
        &batch_ids,
        opts.jobs as i64,
        t0,
        Duration::from_millis(500),
        Poll::Tallies,
        opts,
    )
    .await?;
    let cpu = cpu.per_job(drained.succeeded.max(1) as f64);
    let memory = watch.finish();
    let phases = phases(s.pool(), &batch_ids, t0_unix).await?;
    // First send to the last `finished_at`; the poll's own delay is not counted.
    let total = phases["last_finished_s"]
        .as_f64()
        .map(Duration::from_secs_f64)
        .unwrap_or(drained.elapsed);
    let rate = drained.succeeded as f64 / total.as_secs_f64();
    let mut m = Metric::new(
        &scenario,
        &format!(
            "jobs/s, {} pins, {workers} worker(s) x {} concurrency",
            opts.jobs, opts.concurrency
        ),
        rate,
        "jobs/s",
    )
    .at_least(25_000.0);
    if !drained.complete {
        m = m.note(format!(
            "only {} of {} finished within {} s",
            drained.finished, opts.jobs, opts.timeout_secs
        ));
    }
    let mut metrics = vec![
        m,
        Metric::new(
            &scenario,
            "submit wall (all 202s)",
            submit_wall.as_secs_f64(),
            "s",
        ),
        Metric::new(
            &scenario,
            "first submit -> last succeeded",
            total.as_secs_f64(),
            "s",
        ),
    ];
    // How evenly the worker processes shared the jobs: successes per worker, from the
    // jobs' rows (each success names its worker).
    let shares: Vec<(i64,)> = sqlx::query_as(
        "SELECT count(*) FROM jobs
         WHERE batch_id = ANY($1) AND state = 'succeeded'
         GROUP BY succeeded_by ORDER BY 1 DESC",
    )
    .bind(&batch_ids)
    .fetch_all(s.pool())
    .await?;
    let shares: Vec<i64> = shares.into_iter().map(|(n,)| n).collect();
    if workers > 1 {
        let least = if shares.len() < workers {
            0
        } else {
            shares.last().copied().unwrap_or(0)
        };
        metrics.push(Metric::new(
            &scenario,
            "jobs run by the busiest / the least busy worker",
            shares.first().copied().unwrap_or(0) as f64 / least.max(1) as f64,
            "x",
        ));
    }
    for (key, what) in [
        ("all_us", "CPU per job: the whole machine"),
        ("postgres_us", "CPU per job: PostgreSQL"),
        ("workers_us", "CPU per job: worker(s)"),
        ("bench_us", "CPU per job: the bench (Kubo double, clients)"),
        ("rabbitmq_us", "CPU per job: RabbitMQ"),
        ("api_us", "CPU per job: api"),
    ] {
        metrics.push(Metric::new(
            &scenario,
            what,
            cpu[key].as_f64().unwrap_or(f64::NAN),
            "us",
        ));
    }
    for (label, _) in s.procs() {
        let peak = memory[&label]["vmhwm_mib"].as_f64().unwrap_or(0.0);
        metrics.push(Metric::new(
            &scenario,
            &format!("{label} peak RSS"),
            peak,
            "MiB",
        ));
    }
    Ok(Outcome {
        metrics,
        details: json!({
            "cpu_per_job": cpu,
            "workers": workers,
            "succeeded_per_worker": shares,
            "concurrency": opts.concurrency,
            "jobs": opts.jobs,
            "succeeded": drained.succeeded,
            "finished": drained.finished,
            "complete": drained.complete,
            "submit_wall_s": secs(submit_wall),
            "total_s": secs(total),
            "noticed_by_poll_s": secs(drained.elapsed),
            "phases_from_first_send": phases,
            "db_polls": drained.polls,
            "mean_poll_ms": (drained.mean_poll_ms * 10.0).round() / 10.0,
            "double_calls": s.double_counters(),
            "memory": memory,
            "loadavg_after": report::loadavg(),
        }),
    })
}

/// The CPU a run used, per job: each of pinq's processes, the bench (which holds the
/// Kubo double and the submitting clients), PostgreSQL, RabbitMQ and the rest, from
/// `/proc`, from the first send until [`wait_finished`] returns (its last two counts of
/// the run's jobs included: about 2 µs a job of PostgreSQL at 100,000 jobs). It tells
/// where the end-to-end rate's CPU budget goes (two cores at 25,000 jobs/s leave 80 µs a
/// job). Like the rate, it moves with the host's speed.
struct JobCpu {
    machine: rss::CpuMark,
    procs: Vec<(String, i32, f64)>,
}

/// The CPU each of a stack's processes has used so far: `(label, pid, seconds)`.
fn procs_cpu(s: &BenchStack) -> Vec<(String, i32, f64)> {
    s.procs()
        .into_iter()
        .map(|(label, pid)| (label, pid, rss::process_cpu_s(pid)))
        .collect()
}

/// What each process used since `before` ([`procs_cpu`]), in seconds.
fn procs_used(before: &[(String, i32, f64)]) -> Vec<(&str, f64)> {
    before
        .iter()
        .map(|(label, pid, secs)| (label.as_str(), rss::process_cpu_s(*pid) - secs))
        .collect()
}

impl JobCpu {
    fn start(s: &BenchStack) -> JobCpu {
        JobCpu {
            machine: rss::CpuMark::read(std::process::id() as i32),
            procs: procs_cpu(s),
        }
    }

    /// Microseconds of CPU per job since [`JobCpu::start`], for `jobs` jobs.
    fn per_job(&self, jobs: f64) -> Value {
        let now = rss::CpuMark::read(std::process::id() as i32);
        let us = |secs: f64| (secs * 1e6 / jobs).round();
        let mut out = serde_json::Map::new();
        let mut workers = 0.0;
        for (label, used) in procs_used(&self.procs) {
            if label.starts_with("worker") {
                workers += used;
            }
            out.insert(format!("{label}_us"), json!(us(used)));
        }
        out.insert("workers_us".into(), json!(us(workers)));
        out.insert(
            "bench_us".into(),
            json!(us(now.process_s - self.machine.process_s)),
        );
        let by_program = self.machine.by_program(&now);
        for (program, secs) in by_program.as_object().into_iter().flatten() {
            if program != "pinq" && program != "bench" {
                out.insert(
                    format!("{program}_us"),
                    json!(us(secs.as_f64().unwrap_or(0.0))),
                );
            }
        }
        out.insert(
            "all_us".into(),
            json!(us(now.machine_busy_s - self.machine.machine_busy_s)),
        );
        Value::Object(out)
    }
}

/// Latency at a steady offered load: a batch every 10 ms, `latency_warmup_secs` of warm-up
/// (each database connection's first statements prepare them and their triggers' plans),
/// then `latency_secs` measured.
async fn latency(opts: &Opts) -> anyhow::Result<Outcome> {
    let s = BenchStack::start(opts, 1, opts.concurrency, Some(DoubleConfig::default())).await?;
    let per_tick = (opts.rate / 100).max(1);
    let warmup_ticks = opts.latency_warmup_secs as usize * 100;
    let ticks = warmup_ticks + opts.latency_secs as usize * 100;
    let bodies = s.bodies(0, per_tick * ticks, per_tick, 5);
    let submitter = s.submitter();
    let watch = RssWatch::start(s.procs());
    // At most 200 submits outstanding; a tick that finds none free is counted as not
    // offered (the API could not keep up), so the offered load is honest.
    let permits = Arc::new(tokio::sync::Semaphore::new(200));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut skipped = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut t0 = Instant::now();
    for (i, body) in bodies.into_iter().enumerate() {
        tick.tick().await;
        if i == warmup_ticks {
            t0 = Instant::now();
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            skipped += usize::from(i >= warmup_ticks);
            continue;
        };
        let (sub, tx) = (submitter.clone(), tx.clone());
        tokio::spawn(async move {
            let r = sub.send(body).await;
            drop(permit);
            let _ = tx.send((i < warmup_ticks, r));
        });
    }
    drop(tx);
    let offer_wall = t0.elapsed();
    let mut sent = Vec::new();
    let mut warmup = Vec::new();
    let (mut errors, mut warmup_errors) = (0usize, 0usize);
    while let Some((in_warmup, r)) = rx.recv().await {
        match r {
            Ok(x) if in_warmup => warmup.push(x),
            Ok(x) => sent.push(x),
            Err(e) => {
                if errors + warmup_errors == 0 {
                    eprintln!("latency: a submit failed: {e:#}");
                }
                if in_warmup {
                    warmup_errors += 1;
                } else {
                    errors += 1;
                }
            }
        }
    }
    let total = ((sent.len() + warmup.len()) * per_tick) as i64;
    let batch_ids = ids(&sent);
    let all_ids: Vec<Uuid> = batch_ids.iter().copied().chain(ids(&warmup)).collect();
    let drained = wait_finished(
        s.pool(),
        &all_ids,
        total,
        Instant::now(),
        Duration::from_millis(50),
        Poll::Batches,
        opts,
    )
    .await?;
    let memory = watch.finish();
    // created_at is the API transaction's start, started_at the claim's, finished_at the
    // worker's outcome statement's; "client" is from the moment the client sent the batch.
    // The two halves split submit->done at the claim: before it the batch's commit, the
    // publish and the delivery; after it the claim's commit, the backend call and the
    // wait for the completer.
    let (n, q) = latency_figures(s.pool(), &sent).await?;
    let (warmup_n, wq) = latency_figures(s.pool(), &warmup).await?;
    let at = |i: usize| q.get(i).copied().flatten();
    let (p50, p90, p99, max, c50, c99, cmax) = (at(0), at(1), at(2), at(3), at(4), at(5), at(6));
    let warm = |i: usize| wq.get(i).copied().flatten();
    let offered = (sent.len() * per_tick) as f64 / offer_wall.as_secs_f64();
    let mut took: Vec<f64> = sent.iter().map(|x| x.took.as_secs_f64() * 1000.0).collect();
    took.sort_by(f64::total_cmp);
    let f = |v: Option<f64>| v.unwrap_or(f64::NAN);
    let mut metrics = vec![
        Metric::new("latency", "offered load achieved", offered, "jobs/s"),
        Metric::new(
            "latency",
            "submit->done p50 (created_at->finished_at)",
            f(p50),
            "ms",
        )
        .at_most(5.0),
        Metric::new("latency", "submit->done p90", f(p90), "ms"),
        Metric::new("latency", "submit->done p99", f(p99), "ms").at_most(25.0),
        Metric::new("latency", "submit->done max", f(max), "ms"),
        Metric::new("latency", "client send->done p50", f(c50), "ms"),
        Metric::new("latency", "client send->done p99", f(c99), "ms"),
        Metric::new("latency", "batch 202 p50", percentile(&took, 0.5), "ms"),
        Metric::new("latency", "batch 202 p99", percentile(&took, 0.99), "ms"),
        Metric::new(
            "latency",
            "warm-up (not counted above): submit->done p99",
            f(warm(2)),
            "ms",
        ),
    ];
    if skipped > 0 || errors > 0 || !drained.complete {
        metrics[0] = metrics[0].clone().note(format!(
            "{skipped} ticks not offered, {errors} submits failed, {} of {total} finished",
            drained.finished
        ));
    }
    Ok(Outcome {
        metrics,
        details: json!({
            "offered_jobs_per_s": opts.rate,
            "batch_size": per_tick,
            "seconds": opts.latency_secs,
            "warmup_seconds": opts.latency_warmup_secs,
            "jobs": n,
            "ticks_not_offered": skipped,
            "submit_errors": errors,
            "ms_created_to_finished": {"p50": p50, "p90": p90, "p99": p99, "max": max},
            "ms_client_send_to_finished": {"p50": c50, "p99": c99, "max": cmax},
            "ms_created_to_started": {"p50": at(7), "p99": at(8)},
            "ms_started_to_finished": {"p50": at(9), "p99": at(10)},
            "warmup": {
                "jobs": warmup_n,
                "submit_errors": warmup_errors,
                "ms_created_to_finished": {"p50": warm(0), "p90": warm(1), "p99": warm(2), "max": warm(3)},
            },
            "batch_202_ms": {"p50": percentile(&took, 0.5), "p99": percentile(&took, 0.99), "max": percentile(&took, 1.0)},
            "double_calls": s.double_counters(),
            "memory": memory,
            "loadavg_after": report::loadavg(),
        }),
    })
}

/// The latency percentiles of the succeeded jobs of `sent`'s batches: submit->done p50,
/// p90, p99, max; from the client's send p50, p99, max; before the claim p50, p99; after
/// it p50, p99 (all in ms), and how many jobs.
async fn latency_figures(pool: &PgPool, sent: &[Sent]) -> anyhow::Result<(i64, Vec<Option<f64>>)> {
    let sent_at: Vec<f64> = sent.iter().map(|x| x.sent_unix).collect();
    Ok(sqlx::query_as(
        "WITH l AS (
             SELECT extract(epoch FROM j.finished_at - j.created_at)::float8 * 1000 AS db_ms,
                    (extract(epoch FROM j.finished_at)::float8 - s.sent) * 1000 AS client_ms,
                    extract(epoch FROM j.started_at - j.created_at)::float8 * 1000 AS to_claim_ms,
                    extract(epoch FROM j.finished_at - j.started_at)::float8 * 1000 AS claim_to_done_ms
             FROM jobs j JOIN unnest($1::uuid[], $2::float8[]) AS s(batch_id, sent)
                  ON j.batch_id = s.batch_id
             WHERE j.state = 'succeeded'
         )
         SELECT count(*),
                ARRAY[percentile_cont(0.5) WITHIN GROUP (ORDER BY db_ms),
                      percentile_cont(0.9) WITHIN GROUP (ORDER BY db_ms),
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY db_ms),
                      max(db_ms),
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY client_ms),
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY client_ms),
                      max(client_ms),
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY to_claim_ms),
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY to_claim_ms),
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY claim_to_done_ms),
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY claim_to_done_ms)]
         FROM l",
    )
    .bind(ids(sent))
    .bind(&sent_at)
    .fetch_one(pool)
    .await?)
}

fn parse_range_ms(s: &str) -> anyhow::Result<Latency> {
    let ms = |x: &str| -> anyhow::Result<Duration> {
        Ok(Duration::from_millis(x.trim().parse().with_context(
            || format!("'{x}' is not a number of milliseconds"),
        )?))
    };
    Ok(match s.split_once('-') {
        Some((a, b)) => Latency::Uniform(ms(a)?, ms(b)?),
        None if s.trim() == "0" => Latency::None,
        None => Latency::Fixed(ms(s)?),
    })
}

/// Priority: a priority-9 batch submitted behind a backlog of priority-1 jobs.
async fn priority(opts: &Opts) -> anyhow::Result<Outcome> {
    let latency = parse_range_ms(&opts.priority_double_ms)?;
    let config = DoubleConfig {
        latency,
        error_rate: 0.0,
    };
    let s = BenchStack::start(opts, 1, opts.priority_concurrency, Some(config)).await?;
    let backlog = s.bodies(0, opts.jobs, opts.batch_ops, 1);
    let urgent = s.bodies(opts.jobs, opts.priority_batch, opts.priority_batch, 9);
    let watch = RssWatch::start(s.procs());
    let t0 = Instant::now();
    let (sent, _) = s.submitter().send_all(backlog, opts.clients).await?;
    let backlog_ids = ids(&sent);
    // Wait until the whole backlog is in the broker and the worker is busy with it.
    loop {
        let (succeeded, _, undispatched) = counts(s.pool(), &backlog_ids).await?;
        if undispatched == 0 && succeeded > 0 {
            break;
        }
        if t0.elapsed() > opts.timeout() {
            bail!("priority: the backlog was not dispatched within the timeout");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (done_before, _, _) = counts(s.pool(), &backlog_ids).await?;
    let mut urgent_sent = None;
    for b in urgent {
        urgent_sent = Some(s.submitter().send(b).await?);
    }
    let urgent_sent = urgent_sent.context("no priority-9 batch")?;
    let drained = wait_finished(
        s.pool(),
        &[urgent_sent.id],
        opts.priority_batch as i64,
        Instant::now(),
        Duration::from_millis(20),
        Poll::Batches,
        opts,
    )
    .await?;
    let (done_after, _, _) = counts(s.pool(), &backlog_ids).await?;
    let memory = watch.finish();
    let (start_ms, finish_ms): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT (extract(epoch FROM min(started_at))::float8 - $2) * 1000,
                (extract(epoch FROM max(finished_at))::float8 - $2) * 1000
         FROM jobs WHERE batch_id = $1",
    )
    .bind(urgent_sent.id)
    .bind(urgent_sent.sent_unix)
    .fetch_one(s.pool())
    .await?;
    let backlog_left = opts.jobs as i64 - done_after;
    let mut start = Metric::new(
        "priority",
        &format!(
            "priority-9 batch of {} starts (send -> first started_at)",
            opts.priority_batch
        ),
        start_ms.unwrap_or(f64::NAN),
        "ms",
    )
    .at_most(250.0);
    if !drained.complete || backlog_left <= 0 {
        start = start.note(format!(
            "urgent finished={} of {}, backlog left={backlog_left}",
            drained.finished, opts.priority_batch
        ));
    }
    Ok(Outcome {
        metrics: vec![
            start,
            Metric::new(
                "priority",
                "priority-9 batch finishes (send -> last finished_at)",
                finish_ms.unwrap_or(f64::NAN),
                "ms",
            ),
            Metric::new(
                "priority",
                "priority-1 backlog still unfinished when it finished",
                backlog_left as f64,
                "jobs",
            ),
        ],
        details: json!({
            "backlog_jobs": opts.jobs,
            "backlog_done_before_submit": done_before,
            "backlog_done_after_urgent": done_after,
            "double_latency": latency.to_string(),
            "worker_concurrency": opts.priority_concurrency,
            "urgent_start_ms": start_ms,
            "urgent_finish_ms": finish_ms,
            "double_calls": s.double_counters(),
            "memory": memory,
            "loadavg_after": report::loadavg(),
        }),
    })
}

/// The worker's memory with `inflight` pins under way at once on a slow double.
async fn inflight(opts: &Opts) -> anyhow::Result<Outcome> {
    let config = DoubleConfig {
        latency: Latency::Fixed(Duration::from_secs(3)),
        error_rate: 0.0,
    };
    let s = BenchStack::start(opts, 1, opts.inflight, Some(config)).await?;
    let jobs = opts.inflight * 2;
    let bodies = s.bodies(0, jobs, opts.batch_ops, 5);
    let watch = RssWatch::start(s.procs());
    let worker_pid = s.stack.workers.first().map(|w| w.pid()).unwrap_or(0);
    let t0 = Instant::now();
    let (sent, _) = s.submitter().send_all(bodies, 1).await?;
    let double = s.double.as_ref().context("no double")?;
    // Sample the worker's RSS whenever (nearly) all its slots are busy.
    let mut max_rss_busy = 0u64;
    let mut busy_samples = 0u32;
    let full = (opts.inflight as u64 * 95) / 100;
    let batch_ids = ids(&sent);
    let (mut finished, mut last_change) = (0, Instant::now());
    while t0.elapsed() < opts.timeout() {
        let in_flight = double
            .counters()
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed);
        if in_flight >= full {
            busy_samples += 1;
            max_rss_busy = max_rss_busy.max(rss::status_kib(worker_pid, "VmRSS:"));
        }
        let now = counts(s.pool(), &batch_ids).await?.1;
        if now != finished {
            (finished, last_change) = (now, Instant::now());
        }
        if finished >= jobs as i64 || last_change.elapsed() > opts.stall() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let max_in_flight = double
        .counters()
        .max_in_flight
        .load(std::sync::atomic::Ordering::Relaxed);
    let memory = watch.finish();
    let hwm = memory["worker-1"]["vmhwm_mib"].as_f64().unwrap_or(0.0);
    let mut m = Metric::new(
        "inflight",
        &format!(
            "worker RSS with {} pins in flight (max VmRSS while busy)",
            opts.inflight
        ),
        rss::mib(max_rss_busy),
        "MiB",
    )
    .at_most(64.0);
    if busy_samples == 0 {
        m = m.note(format!(
            "the worker never had {full} pins in flight (max {max_in_flight})"
        ));
    }
    Ok(Outcome {
        metrics: vec![
            m,
            Metric::new("inflight", "worker peak RSS (VmHWM)", hwm, "MiB").at_most(64.0),
            Metric::new(
                "inflight",
                "most pins in flight at the double",
                max_in_flight as f64,
                "pins",
            ),
        ],
        details: json!({
            "worker_concurrency": opts.inflight,
            "jobs": jobs,
            "finished": finished,
            "double_latency": config.latency.to_string(),
            "busy_samples": busy_samples,
            "max_in_flight": max_in_flight,
            "double_calls": s.double_counters(),
            "memory": memory,
        }),
    })
}

/// The scheduler's index update on a backend with `--index-pins` pins in pinq's index:
/// each run's time (the run's own `started_at` to `finished_at`), the WAL the server wrote
/// meanwhile, and how many pin rows the run rewrote (rows whose `xmin` changed). 1 % of
/// the index is not on the node (missing, and repaired: the repair jobs stay queued, as no
/// worker runs) and the node holds 1 % that the index does not know (unmanaged). The
/// schedule is off; the runs are asked for through the API, one after the other.
async fn index_update(opts: &Opts) -> anyhow::Result<Outcome> {
    let s = BenchStack::start(opts, 0, opts.concurrency, Some(DoubleConfig::default())).await?;
    let resp = s
        .stack
        .req(reqwest::Method::PATCH, "/v1/schedules/index-update")
        .json(&json!({"enabled": false}))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status() == 200,
        "PATCH /v1/schedules/index-update: {}",
        resp.status()
    );
    let double = s.double.as_ref().context("no double")?;
    let n = opts.index_pins;
    let skew = n / 100;
    let cid = |k: usize| kubo_double::synthetic_cid(s.salt, k as u64);
    for k in skew..n + skew {
        double.set_pinned(&cid(k), true);
    }
    let cids: Vec<String> = (0..n).map(cid).collect();
    for chunk in cids.chunks(10_000) {
        sqlx::query(
            "INSERT INTO pins (backend_id, cid, owner, status, pinned_at, verified_at)
             SELECT b.id, c, 'admin', 'pinned', now(), now()
             FROM backends b, unnest($1::text[]) AS c WHERE b.name = 'double'",
        )
        .bind(chunk)
        .execute(s.pool())
        .await?;
    }
    // As autovacuum would have left a table that jobs filled over time.
    sqlx::query("VACUUM (ANALYZE) pins")
        .execute(s.pool())
        .await?;

    let watch = RssWatch::start(s.procs());
    let scheduler_pid = s.stack.scheduler.as_ref().map_or(0, |p| p.pid());
    let mut metrics = Vec::new();
    let mut runs = Vec::new();
    for i in 1..=opts.index_runs {
        sqlx::query("DROP TABLE IF EXISTS bench_rows")
            .execute(s.pool())
            .await?;
        sqlx::query("CREATE TABLE bench_rows AS SELECT cid, xmin::text AS x FROM pins")
            .execute(s.pool())
            .await?;
        let wal0 = wal_lsn(s.pool()).await?;
        let cpu0 = rss::CpuMark::read(scheduler_pid);
        let resp = s
            .stack
            .req(reqwest::Method::POST, "/v1/schedules/index-update/run")
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 202, "run: {}", resp.status());
        let run: Value = resp.json().await?;
        let run_id = run["id"].as_i64().context("run id")?;
        let t0 = Instant::now();
        let (status, secs, output) = loop {
            let (status, secs, output): (String, Option<f64>, Option<sqlx::types::Json<Value>>) =
                sqlx::query_as(
                    "SELECT status, extract(epoch FROM finished_at - started_at)::float8, output
                     FROM schedule_runs WHERE id = $1",
                )
                .bind(run_id)
                .fetch_one(s.pool())
                .await?;
            if status != "pending" && status != "running" {
                break (status, secs, output.map(|o| o.0));
            }
            anyhow::ensure!(
                t0.elapsed() < opts.timeout(),
                "index update run {i} not done"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let cpu1 = rss::CpuMark::read(scheduler_pid);
        let wal_bytes = wal_since(s.pool(), &wal0).await?;
        let (rewritten,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pins p JOIN bench_rows r USING (cid) WHERE p.xmin::text <> r.x",
        )
        .fetch_one(s.pool())
        .await?;
        anyhow::ensure!(
            status == "succeeded",
            "index update run {i}: {status} {output:?}"
        );
        let figure = |k: &str| output.as_ref().and_then(|o| o[k].as_u64()).unwrap_or(0);
        let want = [
            ("verified", n - skew),
            ("missing", skew),
            ("unmanaged", skew),
            ("repaired", if i == 1 { skew } else { 0 }),
        ];
        for (k, v) in want {
            anyhow::ensure!(
                figure(k) == v as u64,
                "index update run {i}: {k} {} where {v} was expected: {output:?}",
                figure(k)
            );
        }
        let secs = secs.unwrap_or(f64::NAN);
        metrics.push(Metric::new(
            "index",
            &format!("run {i}: time to list and reconcile {n} pins"),
            secs * 1000.0,
            "ms",
        ));
        metrics.push(Metric::new(
            "index",
            &format!("run {i}: WAL written (whole server)"),
            wal_bytes / 1024.0,
            "KiB",
        ));
        metrics.push(Metric::new(
            "index",
            &format!("run {i}: pin rows rewritten"),
            rewritten as f64,
            "rows",
        ));
        runs.push(json!({
            "run": i, "status": status, "secs": secs, "wal_bytes": wal_bytes,
            "rows_rewritten": rewritten, "output": output,
            // From the request to the poll that saw the run end (every 20 ms).
            "scheduler_cpu_s": ((cpu1.process_s - cpu0.process_s) * 100.0).round() / 100.0,
            "cpu_by_program_s": cpu0.by_program(&cpu1),
        }));
    }
    let memory = watch.finish();
    if let Some(mib) = memory["scheduler"]["vmhwm_mib"].as_f64() {
        metrics.push(Metric::new(
            "index",
            "scheduler peak RSS (VmHWM)",
            mib,
            "MiB",
        ));
    }
    sqlx::query("DROP TABLE IF EXISTS bench_rows")
        .execute(s.pool())
        .await?;
    Ok(Outcome {
        metrics,
        details: json!({
            "pins": n,
            "not_on_the_node": skew,
            "unknown_to_the_index": skew,
            "runs": runs,
            "double_calls": s.double_counters(),
            "memory": memory,
            "loadavg_after": report::loadavg(),
        }),
    })
}

/// Pins `cids` straight on the node with `concurrency` calls at once; returns pins/s.
async fn direct_rate(url: &str, cids: &[String], concurrency: usize) -> anyhow::Result<f64> {
    let client = KuboClient::new(KuboClient::http_client(), url);
    let t = Instant::now();
    let results: Vec<_> = futures::stream::iter(cids.iter().cloned())
        .map(|cid| {
            let client = client.clone();
            async move { client.pin_add(&cid, Duration::from_secs(60)).await }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    anyhow::ensure!(failed == 0, "{failed} direct pins failed");
    Ok(cids.len() as f64 / t.elapsed().as_secs_f64())
}

/// A thread that keeps one core busy for `share` of each 10 ms until dropped: a stand-in
/// for other work on the machine, for the `--direct-beside-load` diagnostic.
struct Burner {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Burner {
    fn start(share: f64) -> Burner {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = (share > 0.0).then(|| {
            let stop = stop.clone();
            let busy = Duration::from_micros((share.min(1.0) * 10_000.0) as u64);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = std::time::Instant::now();
                    while t.elapsed() < busy {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10).saturating_sub(busy));
                }
            })
        });
        Burner { stop, thread }
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The settings of `--pin-group` and `--env` for the stacks.
fn extra_env(opts: &Opts) -> Vec<(String, String)> {
    opts.pin_group
        .map(|g| ("PINQ_PIN_GROUP".to_owned(), g.to_string()))
        .into_iter()
        .chain(opts.env.iter().cloned())
        .collect()
}

/// One `--env NAME=value`.
fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=value, got {s:?}")),
    }
}

/// A real js-ipfs node: pinq's pins/s beside a plain client's, same work and concurrency.
async fn realnode(opts: &Opts) -> anyhow::Result<Outcome> {
    let mut stack = Stack::new().await?;
    stack.env = vec![
        ("RUST_LOG".into(), opts.log.clone()),
        // The production defaults, as in `BenchStack::start`.
        ("PINQ_RELAY_INTERVAL_MS".into(), "500".into()),
        ("PINQ_RELAY_GRACE_MS".into(), "3000".into()),
        (
            "PINQ_WORKER_CONCURRENCY".into(),
            opts.node_concurrency.to_string(),
        ),
        (
            "PINQ_DB_MAX_CONNECTIONS".into(),
            opts.db_connections.to_string(),
        ),
    ];
    stack.env.extend(extra_env(opts));
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.start_scheduler()?;
    let mut s = BenchStack {
        stack,
        double: None,
        salt: 0,
    };
    s.add_workers(1).await?;
    let n = opts.node_pins;
    let rounds = opts.node_rounds.max(1);
    // Disjoint sets of `n` contents: a warm-up pinned directly and not counted (a fresh
    // node's first pins run before its JavaScript is compiled, at about half the later
    // rate), then direct and pinq in turn, `rounds` times, and a last direct run. The node
    // keeps changing speed as it warms up, holds more pins and compacts its datastore, so
    // the two clients take turns and each rate is over all of its runs.
    let node = s.stack.ipfs();
    let t = Instant::now();
    let mut sets = Vec::new();
    for _ in 0..(2 * rounds + 2) {
        sets.push(node.add_unpinned(&unique_contents(n)).await?);
    }
    let add_s = t.elapsed().as_secs_f64();
    let url = node.url.clone();
    let node_pid = node.pid().unwrap_or(0);
    let mut sets = sets.into_iter();
    let warm_up = sets.next().unwrap_or_default();
    let warm_up_rate = direct_rate(&url, &warm_up, opts.node_concurrency).await?;

    let watch = RssWatch::start(s.procs());
    let (mut direct_pins, mut direct_s, mut pinq_pins, mut pinq_s) = (0usize, 0.0, 0i64, 0.0);
    let mut runs = Vec::new();
    let mut incomplete = None;
    let mut left_unfinished = false;
    for round in 0..=rounds {
        let set = sets.next().unwrap_or_default();
        let cpu0 = rss::CpuMark::read(node_pid);
        let load = Burner::start(opts.direct_beside_load);
        let t = Instant::now();
        let rate = direct_rate(&url, &set, opts.node_concurrency).await?;
        direct_s += t.elapsed().as_secs_f64();
        drop(load);
        direct_pins += set.len();
        runs.push(json!({"client": "direct", "pins_per_s": rate,
                         "cpu": cpu0.until(&rss::CpuMark::read(node_pid))}));
        if round == rounds {
            break;
        }
        let set = sets.next().unwrap_or_default();
        let bodies: Vec<Vec<u8>> = set
            .chunks(opts.batch_ops.max(1))
            .map(|c| pin_body(c, 5, "local"))
            .collect();
        let cpu0 = rss::CpuMark::read(node_pid);
        let procs0 = procs_cpu(&s);
        let t0 = Instant::now();
        let t0_unix = unix_now();
        let (sent, _) = s.submitter().send_all(bodies, 1).await?;
        let drained = wait_finished(
            s.pool(),
            &ids(&sent),
            set.len() as i64,
            t0,
            // The rate comes from the jobs' timestamps; the poll only notices the end, so
            // it runs rarely and takes little of the CPU the node and pinq share.
            Duration::from_millis(500),
            // Cheap while every earlier run's jobs have finished.
            if left_unfinished {
                Poll::Batches
            } else {
                Poll::Tallies
            },
            opts,
        )
        .await?;
        left_unfinished |= !drained.complete;
        let mut cpu = cpu0.until(&rss::CpuMark::read(node_pid));
        // pinq's share, split by process.
        cpu["pinq_by_process_cpu_s"] = procs_used(&procs0)
            .into_iter()
            .map(|(label, secs)| (label.to_owned(), json!((secs * 100.0).round() / 100.0)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        // From the first send to the last job's `finished_at`, like the direct client's
        // time (first request to last answer); the poll's own delay is not counted.
        let phases = phases(s.pool(), &ids(&sent), t0_unix).await?;
        let secs_taken = phases["last_finished_s"]
            .as_f64()
            .unwrap_or(drained.elapsed.as_secs_f64());
        pinq_s += secs_taken;
        pinq_pins += drained.succeeded;
        if !drained.complete || drained.succeeded < set.len() as i64 {
            incomplete = Some(format!(
                "round {round}: {} of {} succeeded, {} finished",
                drained.succeeded,
                set.len(),
                drained.finished
            ));
        }
        runs.push(
            json!({"client": "pinq", "pins_per_s": drained.succeeded as f64 / secs_taken,
                         "phases_from_first_send": phases, "cpu": cpu}),
        );
    }
    let memory = watch.finish();
    let direct = direct_pins as f64 / direct_s;
    let pinq_rate = pinq_pins as f64 / pinq_s;
    let pinned = node.pins().await?;
    let mut ratio = Metric::new(
        "realnode",
        "pinq rate as % of the direct client's",
        100.0 * pinq_rate / direct,
        "%",
    )
    .at_least(95.0);
    let mut notes: Vec<String> = incomplete.into_iter().collect();
    if opts.direct_beside_load > 0.0 {
        notes.push(format!(
            "diagnostic: the direct runs had a busy thread taking {} of a core beside them",
            opts.direct_beside_load
        ));
    }
    if !notes.is_empty() {
        ratio = ratio.note(notes.join("; "));
    }
    Ok(Outcome {
        metrics: vec![
            Metric::new(
                "realnode",
                &format!(
                    "pins/s through pinq (js-ipfs, {rounds} x {n} pins, concurrency {})",
                    opts.node_concurrency
                ),
                pinq_rate,
                "pins/s",
            ),
            Metric::new(
                "realnode",
                &format!(
                    "pins/s direct client ({} x {n} pins, taking turns)",
                    rounds + 1
                ),
                direct,
                "pins/s",
            ),
            ratio,
        ],
        details: json!({
            "backend": "a real js-ipfs node (deploy/ipfs/node.mjs)",
            "pins_per_run": n,
            "rounds": rounds,
            "concurrency": opts.node_concurrency,
            "direct_beside_load_cores": opts.direct_beside_load,
            "warm_up_pins_per_s": warm_up_rate,
            "pinq_pins_per_s": pinq_rate,
            "direct_pins_per_s": direct,
            // In order. `cpu`: who used the two cores in each run, the node and everything
            // else (pinq's processes, PostgreSQL, RabbitMQ and the bench itself).
            "runs": runs,
            "node_pins_at_end": pinned.len(),
            "add_unpinned_s": (add_s * 1000.0).round() / 1000.0,
            "memory": memory,
            "loadavg_after": report::loadavg(),
        }),
    })
}

// ---------------------------------------------------------------------------------------

async fn pg_version() -> String {
    match pinq_e2e::TestDb::create().await {
        Ok(db) => sqlx::query_as::<_, (String,)>("SHOW server_version")
            .fetch_one(&db.pool)
            .await
            .map(|r| r.0)
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    for s in opts.scenario.split(',') {
        let s = s.trim();
        anyhow::ensure!(
            s == "all" || SCENARIOS.contains(&s),
            "unknown scenario '{s}' (all, {})",
            SCENARIOS.join(", ")
        );
    }
    let machine = report::machine(&pg_version().await);
    println!("pinq benchmark: {}", opts.scenario);
    println!("machine: {machine}");
    println!(
        "NOTE: except `realnode`, the backend is a {}.",
        kubo_double::LABEL
    );

    let mut metrics: Vec<Metric> = Vec::new();
    let mut details = serde_json::Map::new();
    let mut run = |name: String, r: anyhow::Result<Outcome>| match r {
        Ok(o) => {
            report::print_table(&o.metrics);
            println!();
            metrics.extend(o.metrics);
            details.insert(name, o.details);
        }
        Err(e) => {
            eprintln!("scenario {name} failed: {e:#}");
            metrics
                .push(Metric::new(&name, "scenario failed", f64::NAN, "").note(format!("{e:#}")));
            details.insert(name, json!({"error": format!("{e:#}")}));
        }
    };
    if opts.runs("ingest") {
        println!("== ingest ({DOUBLE_NOTE})");
        run("ingest".into(), ingest(&opts).await);
    }
    if opts.runs("e2e") {
        for &w in &opts.e2e_workers {
            println!("== e2e with {w} worker(s) ({DOUBLE_NOTE})");
            run(format!("e2e/{w}w"), e2e(&opts, w).await);
        }
    }
    if opts.runs("latency") {
        println!("== latency at {} jobs/s offered ({DOUBLE_NOTE})", opts.rate);
        run("latency".into(), latency(&opts).await);
    }
    if opts.runs("priority") {
        println!(
            "== priority ({DOUBLE_NOTE}, latency {} ms)",
            opts.priority_double_ms
        );
        run("priority".into(), priority(&opts).await);
    }
    if opts.runs("inflight") {
        println!(
            "== worker memory with {} pins in flight ({DOUBLE_NOTE})",
            opts.inflight
        );
        run("inflight".into(), inflight(&opts).await);
    }
    if opts.runs("realnode") {
        println!("== real node (js-ipfs)");
        run("realnode".into(), realnode(&opts).await);
    }
    if opts.runs("index") {
        println!(
            "== index update on {} pins ({DOUBLE_NOTE})",
            opts.index_pins
        );
        run("index".into(), index_update(&opts).await);
    }
    if opts.runs("pgonly") {
        println!("== pinq's PostgreSQL statements alone (no API, worker, RabbitMQ or backend)");
        run("pgonly".into(), pgonly::pg_only(&opts).await);
    }

    println!("== summary (targets from issue 7; {DOUBLE_NOTE}, except realnode)");
    report::print_table(&metrics);
    let misses = metrics
        .iter()
        .filter(|m| m.target.is_some() && m.to_json()["pass"] != json!(true))
        .count();
    println!(
        "{} of {} targets met",
        metrics.iter().filter(|m| m.target.is_some()).count() - misses,
        metrics.iter().filter(|m| m.target.is_some()).count()
    );
    let report = json!({
        "bench": "pinq full-stack benchmark (tests/examples/bench.rs)",
        "backend_note": format!("except realnode: {}", kubo_double::LABEL),
        "finished_unix": unix_now(),
        "machine": machine,
        "loadavg_at_end": report::loadavg(),
        "options": {
            "scenario": opts.scenario, "jobs": opts.jobs, "batch_ops": opts.batch_ops,
            "clients": opts.clients, "ingest_batches": opts.ingest_batches,
            "e2e_workers": opts.e2e_workers, "concurrency": opts.concurrency,
            "rate": opts.rate, "latency_secs": opts.latency_secs,
            "priority_double_ms": opts.priority_double_ms,
            "priority_concurrency": opts.priority_concurrency,
            "inflight": opts.inflight, "node_pins": opts.node_pins,
            "node_concurrency": opts.node_concurrency, "log": opts.log,
            "index_pins": opts.index_pins, "index_runs": opts.index_runs,
            "db_connections": opts.db_connections, "pin_group": opts.pin_group,
            "pg_group": opts.pg_group, "pg_sql": opts.pg_sql,
            "env": opts.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        },
        "results": metrics.iter().map(Metric::to_json).collect::<Vec<_>>(),
        "details": details,
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &opts.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, &text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
