//! `pinq bench`: the stress test. Submits N operations as fast as the API accepts them
//! (C submitters, batches of B), waits until every job is done, and reports accepted/s,
//! completed/s and submit→done latency percentiles from each job's own timestamps.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pinq_core::cid::PinCid;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::UsageError;
use crate::client::Client;
use crate::output::{self, Table, print_json};

const BENCH_AFTER_HELP: &str = "\
CIDs are random CIDv1 (raw codec, random sha2-256 digest) unless --cids-from names a
file of CIDs (one per line, used in turn). Unpinning a CID that is not pinned succeeds
on a real node, so `--op unpin` (the default) measures pinq itself against any backend.
`--op pin` of random CIDs only completes against a backend that answers at once (a test
double) — against a real node each pin waits for content nobody has until
PINQ_PIN_TIMEOUT_SECS; use --cids-from with CIDs the node holds instead.

Example:
  pinq bench --jobs 10000 --concurrency 8 --batch-size 500 --backend local";

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = BENCH_AFTER_HELP)]
pub struct BenchArgs {
    /// Operations to submit in total.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub jobs: u64,
    /// Submitters running at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub concurrency: u64,
    /// Operation to submit; mixed alternates pin and unpin.
    #[arg(long, value_enum, default_value_t = BenchOp::Unpin)]
    pub op: BenchOp,
    /// Operations per batch.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// Backend to target; repeat for several [default: every enabled backend].
    #[arg(long = "backend", value_name = "NAME")]
    pub backends: Vec<String>,
    /// Take CIDs from this file (one per line) instead of random ones.
    #[arg(long, value_name = "FILE")]
    pub cids_from: Option<String>,
    /// Batch priority, 0-9.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: Option<u8>,
    /// Give up waiting for completion after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOp {
    Pin,
    Unpin,
    Mixed,
}

/// A random CIDv1 (raw codec, sha2-256 multihash of random bytes).
pub fn random_cid() -> String {
    let digest: [u8; 32] = rand::random();
    match cid::multihash::Multihash::<64>::wrap(0x12, &digest) {
        Ok(mh) => cid::Cid::new_v1(0x55, mh).to_string(),
        // A 32-byte digest always fits a 64-byte multihash.
        Err(_) => String::new(),
    }
}

fn op_name(op: BenchOp, i: u64) -> &'static str {
    match op {
        BenchOp::Pin => "pin",
        BenchOp::Unpin => "unpin",
        BenchOp::Mixed if i.is_multiple_of(2) => "pin",
        BenchOp::Mixed => "unpin",
    }
}

fn bar(client: &Client, len: u64, what: &str) -> ProgressBar {
    if client.json() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>9} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {{per_sec}} ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

pub async fn run(client: &Client, args: BenchArgs) -> anyhow::Result<()> {
    let cids: Option<Arc<Vec<String>>> = match &args.cids_from {
        None => None,
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| UsageError(format!("cannot read {f}: {e}")))?;
            let list: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            if let Some(bad) = list.iter().find(|c| PinCid::parse(c).is_err()) {
                return Err(UsageError(format!("{f}: '{bad}' is not a CID")).into());
            }
            if list.is_empty() {
                return Err(UsageError(format!("{f}: no CIDs")).into());
            }
            Some(Arc::new(list))
        }
    };
    let n_batches = args.jobs.div_ceil(args.batch_size);
    let next = Arc::new(AtomicUsize::new(0));
    let batches: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let submit_bar = bar(client, args.jobs, "submitted");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.min(n_batches) {
        let (client, next, batches, cids, args, submit_bar) = (
            client.clone(),
            next.clone(),
            batches.clone(),
            cids.clone(),
            args.clone(),
            submit_bar.clone(),
        );
        tasks.spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed) as u64;
                if b >= n_batches {
                    return Ok::<(), anyhow::Error>(());
                }
                let first = b * args.batch_size;
                let last = (first + args.batch_size).min(args.jobs);
                let ops: Vec<Value> = (first..last)
                    .map(|i| {
                        let cid = match &cids {
                            Some(list) => list[(i as usize) % list.len()].clone(),
                            None => random_cid(),
                        };
                        json!({"op": op_name(args.op, i), "cid": cid})
                    })
                    .collect();
                let mut body = json!({ "ops": ops });
                if !args.backends.is_empty() {
                    body["backends"] = json!(args.backends);
                }
                if let Some(p) = args.priority {
                    body["priority"] = json!(p);
                }
                let resp = client.post("/v1/batches", Some(&body)).await?;
                let id = resp["id"]
                    .as_str()
                    .context("the API accepted a batch but returned no id")?;
                batches.lock().await.push(id.to_owned());
                submit_bar.inc(last - first);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("a submitter panicked")??;
    }
    let submit_secs = started.elapsed().as_secs_f64();
    submit_bar.finish_and_clear();
    let batches = batches.lock().await.clone();

    // Wait for every batch to be done.
    let mut jobs_total = 0u64;
    let mut views = Vec::with_capacity(batches.len());
    for id in &batches {
        let b = client.get(&format!("/v1/batches/{id}"), &[]).await?;
        jobs_total += b["jobs"].as_u64().unwrap_or(0);
        views.push(b);
    }
    let done_bar = bar(client, jobs_total, "completed");
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let finished: u64 = views.iter().map(finished_of).sum();
        done_bar.set_position(finished);
        if views.iter().all(|b| b["state"] == "done") {
            break;
        }
        if Instant::now() > deadline {
            done_bar.finish_and_clear();
            anyhow::bail!(
                "bench: {finished} of {jobs_total} jobs finished within {} s (raise --timeout; see `pinq status` for workers and backends)",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, id) in batches.iter().enumerate() {
            if views[i]["state"] != "done" {
                views[i] = client.get(&format!("/v1/batches/{id}"), &[]).await?;
            }
        }
    }
    let wall_secs = started.elapsed().as_secs_f64();
    done_bar.finish_and_clear();

    // Latency from each job's own timestamps.
    let mut latencies = Vec::with_capacity(jobs_total as usize);
    let (mut first_created, mut last_finished): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        (None, None);
    let (mut succeeded, mut failed, mut cancelled) = (0u64, 0u64, 0u64);
    for id in &batches {
        let mut after: Option<String> = None;
        loop {
            let mut q = vec![("limit", "1000".to_owned())];
            if let Some(a) = &after {
                q.push(("after", a.clone()));
            }
            let page = client.get(&format!("/v1/batches/{id}/jobs"), &q).await?;
            for j in page["jobs"].as_array().into_iter().flatten() {
                match j["state"].as_str() {
                    Some("succeeded") => succeeded += 1,
                    Some("failed") => failed += 1,
                    Some("cancelled") => cancelled += 1,
                    _ => {}
                }
                let (Some(c), Some(f)) = (
                    output::parse_time(&j["created_at"]),
                    output::parse_time(&j["finished_at"]),
                ) else {
                    continue;
                };
                latencies.push((f - c).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                first_created = Some(first_created.map_or(c, |x| x.min(c)));
                last_finished = Some(last_finished.map_or(f, |x| x.max(f)));
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_owned()),
                None => break,
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let span_secs = match (first_created, last_finished) {
        (Some(a), Some(b)) => ((b - a).num_milliseconds() as f64 / 1000.0).max(0.001),
        _ => wall_secs,
    };
    let completed = succeeded + failed + cancelled;
    let report = json!({
        "ops": args.jobs,
        "jobs": jobs_total,
        "batches": batches.len(),
        "op": op_name_all(args.op),
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "submit_secs": submit_secs,
        "accepted_per_sec": args.jobs as f64 / submit_secs.max(0.001),
        "wall_secs": wall_secs,
        "completed_per_sec": completed as f64 / span_secs,
        "succeeded": succeeded,
        "failed": failed,
        "cancelled": cancelled,
        "latency_ms": {
            "p50": percentile(&latencies, 0.50),
            "p90": percentile(&latencies, 0.90),
            "p99": percentile(&latencies, 0.99),
            "max": latencies.last().copied(),
        },
    });
    if client.json() {
        print_json(&report);
    } else {
        let mut t = Table::new(&["METRIC", "VALUE"]);
        let f = |v: &Value| v.as_f64().map(|x| format!("{x:.1}")).unwrap_or("-".into());
        let l = &report["latency_ms"];
        for (k, v) in [
            ("operations", output::n(&report["ops"])),
            ("jobs", output::n(&report["jobs"])),
            ("batches", output::n(&report["batches"])),
            ("submit time", format!("{}s", f(&report["submit_secs"]))),
            ("accepted/s", f(&report["accepted_per_sec"])),
            ("completed/s", f(&report["completed_per_sec"])),
            ("succeeded", output::n(&report["succeeded"])),
            ("failed", output::n(&report["failed"])),
            ("cancelled", output::n(&report["cancelled"])),
            ("latency p50", output::ms_field(&l["p50"])),
            ("latency p90", output::ms_field(&l["p90"])),
            ("latency p99", output::ms_field(&l["p99"])),
            ("latency max", output::ms_field(&l["max"])),
        ] {
            t.row(vec![k.to_owned(), v]);
        }
        t.print();
    }
    if failed > 0 {
        anyhow::bail!(
            "bench: {failed} of {jobs_total} jobs failed (see `pinq jobs ls --state failed`)"
        );
    }
    Ok(())
}

fn op_name_all(op: BenchOp) -> &'static str {
    match op {
        BenchOp::Pin => "pin",
        BenchOp::Unpin => "unpin",
        BenchOp::Mixed => "mixed",
    }
}

fn finished_of(b: &Value) -> u64 {
    let c = &b["counts"];
    ["succeeded", "failed", "cancelled"]
        .iter()
        .map(|k| c[*k].as_u64().unwrap_or(0))
        .sum()
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_cids_are_valid_and_distinct() {
        let a = random_cid();
        assert!(PinCid::parse(&a).is_ok(), "{a}");
        assert_ne!(a, random_cid());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
