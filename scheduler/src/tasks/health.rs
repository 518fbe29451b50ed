//! `health-check`: probes every enabled backend (Kubo: `id`, `version`, `repo/stat`, all
//! within one timeout), records each probe, and moves each backend's status with
//! hysteresis ([`pinq_core::health::next`]).

use std::time::{Duration, Instant};

use futures::StreamExt;
use pinq_core::health::{self, ProbeRecord, ProbeTarget, Thresholds};
use pinq_core::kubo::{BackendError, KuboClient};
use serde_json::{Map, Value, json};

use super::TaskCtx;

/// Backends probed at once.
const CONCURRENCY: usize = 16;

pub async fn run(ctx: &TaskCtx) -> anyhow::Result<Value> {
    let targets = health::probe_targets(&ctx.pool).await?;
    let timeout = Duration::from_millis(ctx.settings.health_probe_timeout_ms.max(1));
    let thresholds = Thresholds {
        down_after: ctx.settings.health_down_after.max(1),
        healthy_after: ctx.settings.health_healthy_after.max(1),
        slow: Duration::from_millis(ctx.settings.health_slow_ms),
    };
    let probed: Vec<(ProbeTarget, ProbeRecord)> = futures::stream::iter(targets)
        .map(|t| {
            let http = ctx.http.clone();
            async move {
                let rec = probe(http, &t, timeout).await;
                (t, rec)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut per_backend = Map::new();
    let mut counts = [0u64; 4];
    for (t, rec) in &probed {
        let Some((before, after)) = health::record_probe(&ctx.pool, t.id, rec, thresholds).await?
        else {
            continue;
        };
        if before != after {
            tracing::warn!(backend = %t.name, from = before.as_str(), to = after.as_str(), error = rec.error.as_deref().unwrap_or(""), "backend status changed");
        }
        counts[after as usize] += 1;
        per_backend.insert(
            t.name.clone(),
            json!({
                "ok": rec.ok,
                "latency_ms": rec.latency_ms,
                "status": after.as_str(),
                "error": rec.error,
            }),
        );
    }
    Ok(json!({
        "probed": probed.len(),
        "healthy": counts[health::Status::Healthy as usize],
        "degraded": counts[health::Status::Degraded as usize],
        "down": counts[health::Status::Down as usize],
        "backends": per_backend,
    }))
}

async fn probe(http: reqwest::Client, t: &ProbeTarget, timeout: Duration) -> ProbeRecord {
    if t.kind != "kubo" {
        return ProbeRecord {
            ok: false,
            error: Some(format!(
                "health checks do not support backends of kind '{}' yet",
                t.kind
            )),
            ..ProbeRecord::default()
        };
    }
    let client = KuboClient::new(http, &t.url);
    let started = Instant::now();
    let calls = async { tokio::try_join!(client.id(), client.version(), client.repo_stat()) };
    let result = tokio::time::timeout(timeout, calls).await;
    let latency_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
    match result {
        Ok(Ok((id, version, stat))) => ProbeRecord {
            ok: true,
            latency_ms,
            error: None,
            peer_id: Some(id.id),
            node_version: Some(version),
            repo_size: i64::try_from(stat.repo_size).ok(),
            num_objects: i64::try_from(stat.num_objects).ok(),
        },
        Ok(Err(e)) => failed(latency_ms, &e),
        Err(_) => ProbeRecord {
            ok: false,
            latency_ms,
            error: Some(format!("probe timed out after {} ms", timeout.as_millis())),
            ..ProbeRecord::default()
        },
    }
}

fn failed(latency_ms: i32, e: &BackendError) -> ProbeRecord {
    ProbeRecord {
        ok: false,
        latency_ms,
        error: Some(e.to_string()),
        ..ProbeRecord::default()
    }
}
