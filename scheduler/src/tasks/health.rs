//! `health-check`: probes every enabled backend (Kubo: `id`, `version`, `repo/stat`, all
//! within one timeout), records each probe, and moves each backend's status with
//! hysteresis ([`pinq_core::health::next`]).

use std::time::Duration;

use futures::StreamExt;
use pinq_core::health::{self, ProbeRecord, ProbeTarget, Thresholds};
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
    health::probe_kubo(http, &t.url, timeout).await
}
