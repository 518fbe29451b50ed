//! The `pgonly` scenario: pinq's own PostgreSQL statements with nothing else running, no
//! API, worker, RabbitMQ or backend. Batches are stored as the API stores them
//! (`pinq_e2e::store_batch`: `db::insert_batch`, then the outbox entry settled as after the
//! publish), then claimed and succeeded as a worker does (`db::claim_jobs`,
//! `db::finish_succeeded`), a group of `--pg-group` jobs a statement (a message's jobs),
//! by `--clients` connections at once. It prints what PostgreSQL and the whole machine
//! used a job in each phase, so the figures compare with the end-to-end scenario's
//! `cpu_per_job` and with `bench/floor/run.sh`, which runs the writes DESIGN.md requires
//! on a schema that has nothing else (docs/performance.md, "The floor").

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use pinq_core::db;
use pinq_core::model::Op;
use pinq_e2e::{TestDb, new_job, random_cid, store_batch};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::report::Metric;
use crate::rss::CpuMark;
use crate::{Opts, Outcome, secs};

/// What one phase took: its wall time and the CPU used meanwhile.
struct Phase {
    wall: Duration,
    machine_s: f64,
    postgres_s: f64,
    bench_s: f64,
}

impl Phase {
    fn between(t0: Instant, cpu0: &CpuMark, cpu1: &CpuMark) -> Phase {
        let programs = cpu0.by_program(cpu1);
        Phase {
            wall: t0.elapsed(),
            machine_s: cpu1.machine_busy_s - cpu0.machine_busy_s,
            postgres_s: programs["postgres"].as_f64().unwrap_or(0.0),
            bench_s: cpu1.process_s - cpu0.process_s,
        }
    }

    fn json(&self, jobs: f64) -> Value {
        let us = |s: f64| (s * 1e6 / jobs * 10.0).round() / 10.0;
        json!({
            "wall_s": secs(self.wall),
            "jobs_per_s": (jobs / self.wall.as_secs_f64()).round(),
            "machine_us_per_job": us(self.machine_s),
            "postgres_us_per_job": us(self.postgres_s),
            "bench_us_per_job": us(self.bench_s),
        })
    }
}

pub async fn pg_only(opts: &Opts) -> anyhow::Result<Outcome> {
    let clients = opts.clients.max(1);
    let group = opts.pg_group.max(1);
    let db = TestDb::create().await?;
    for sql in &opts.pg_sql {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&db.pool)
            .await
            .with_context(|| format!("--pg-sql {sql}"))?;
    }
    let backend = db.insert_backend_row("b").await?;
    let pool = PgPoolOptions::new()
        .max_connections(clients as u32)
        .min_connections(clients as u32)
        .connect(&db.url)
        .await?;
    let worker = Uuid::now_v7();
    db::register_worker(&pool, worker, "bench", std::process::id(), group).await?;

    // The batches, built before anything is measured.
    let n_batches = clients * opts.ingest_batches;
    let mut batches: Vec<Vec<db::NewJob>> = (0..n_batches)
        .map(|_| {
            (0..opts.batch_ops)
                .map(|seq| new_job(backend, seq as i32, Op::Pin, &random_cid()))
                .collect()
        })
        .collect();
    let total = (n_batches * opts.batch_ops) as f64;
    let me = std::process::id() as i32;

    // Stored: each client its share of the batches, one after the other.
    let cpu0 = CpuMark::read(me);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mine: Vec<Vec<db::NewJob>> = batches
            .iter_mut()
            .skip(c)
            .step_by(clients)
            .map(std::mem::take)
            .collect();
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for jobs in mine {
                ids.extend(store_batch(&pool, "bench", jobs).await?.1);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids: Vec<Uuid> = Vec::new();
    for t in tasks {
        ids.extend(t.await??);
    }
    let stored = Phase::between(t0, &cpu0, &CpuMark::read(me));
    ensure!(
        ids.len() as f64 == total,
        "stored {} jobs of {total}",
        ids.len()
    );

    // Claimed and succeeded: each client takes the next group of ids, claims it, and
    // records the group's success, as a worker does with a message's jobs.
    let groups: Arc<Vec<Vec<Uuid>>> = Arc::new(ids.chunks(group).map(<[Uuid]>::to_vec).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = CpuMark::read(me);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (pool, groups, next) = (pool.clone(), groups.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut written = 0usize;
            while let Some(ids) = groups.get(next.fetch_add(1, Ordering::Relaxed)) {
                let claimed = db::claim_jobs(&pool, ids, worker, Duration::from_secs(60)).await?;
                let refs: Vec<&db::ClaimedJob> = claimed.iter().collect();
                written += db::finish_succeeded(&pool, &refs, worker).await?.len();
            }
            anyhow::Ok(written)
        }));
    }
    let mut written = 0;
    for t in tasks {
        written += t.await??;
    }
    let ran = Phase::between(t0, &cpu0, &CpuMark::read(me));
    let succeeded = count_succeeded(&pool).await?;
    ensure!(
        written as f64 == total && succeeded as f64 == total,
        "{written} successes written and {succeeded} jobs succeeded, of {total}"
    );
    pool.close().await;

    let both = stored.wall + ran.wall;
    let per_job = |s: f64| s * 1e6 / total;
    let m = |name: &str, value: f64, unit: &'static str| Metric::new("pgonly", name, value, unit);
    let metrics = vec![
        m(
            "ingest: ops/s stored",
            total / stored.wall.as_secs_f64(),
            "ops/s",
        ),
        m(
            &format!("claim + success in groups of {group}: jobs/s"),
            total / ran.wall.as_secs_f64(),
            "jobs/s",
        ),
        m(
            "both phases, one after the other: jobs/s",
            total / both.as_secs_f64(),
            "jobs/s",
        ),
        m(
            "PostgreSQL CPU a job: ingest",
            per_job(stored.postgres_s),
            "us",
        ),
        m(
            "PostgreSQL CPU a job: claim + success",
            per_job(ran.postgres_s),
            "us",
        ),
        m(
            "PostgreSQL CPU a job: both",
            per_job(stored.postgres_s + ran.postgres_s),
            "us",
        ),
        m(
            "whole machine CPU a job: both",
            per_job(stored.machine_s + ran.machine_s),
            "us",
        ),
        m(
            "the bench's own CPU a job: both",
            per_job(stored.bench_s + ran.bench_s),
            "us",
        ),
    ];
    Ok(Outcome {
        metrics,
        details: json!({
            "jobs": total,
            "clients": clients,
            "group": group,
            "pg_sql": opts.pg_sql,
            "ingest": stored.json(total),
            "claim_and_success": ran.json(total),
            "loadavg_after": crate::report::loadavg(),
        }),
    })
}

async fn count_succeeded(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
            .fetch_one(pool)
            .await?,
    )
}
