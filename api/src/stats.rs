//! `GET /v1/stats`: one snapshot for `pinq status` and `pinq monitor` — job counts,
//! recent throughput and latency, queue depth, backend health and the worker fleet.

use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::State;
use pinq_core::{db, health, stats};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiResult;

/// Longest the stats call waits for RabbitMQ before it reports the depth as unknown.
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Value>> {
    let owner = caller.owner_filter();
    let (counts, recent) = tokio::try_join!(
        stats::job_counts(&state.pool, owner),
        stats::recent(&state.pool, owner)
    )?;
    // The fleet and the backends are shared infrastructure: admins only.
    let (backends, workers) = if caller.admin {
        let backends: Vec<Value> = health::all_backend_health(&state.pool)
            .await?
            .into_iter()
            .map(|h| {
                json!({
                    "name": h.name,
                    "status": h.status,
                    "status_since": h.status_since,
                    "last_probe_at": h.last_probe_at,
                    "last_probe_ok": h.last_probe_ok,
                    "last_probe_latency_ms": h.last_probe_latency_ms,
                    "last_probe_error": h.last_probe_error,
                })
            })
            .collect();
        let workers = db::list_workers(&state.pool).await?;
        let live: Vec<_> = workers
            .iter()
            .filter(|w| w.state == "running" || w.state == "stopping")
            .collect();
        let summary = json!({
            "live": live.len(),
            "concurrency": live.iter().map(|w| i64::from(w.concurrency)).sum::<i64>(),
            "in_flight": live.iter().map(|w| i64::from(w.in_flight)).sum::<i64>(),
            "workers": workers,
        });
        (Value::Array(backends), summary)
    } else {
        (Value::Null, Value::Null)
    };
    // The broker is shared infrastructure, like backends and workers: admins only.
    let queue_depth = if caller.admin {
        queue_depth(&state).await
    } else {
        None
    };
    Ok(Json(json!({
        "at": chrono::Utc::now(),
        "jobs": counts,
        "totals": {"succeeded": counts.succeeded, "failed": counts.failed},
        "recent": recent,
        "queue": if caller.admin {
            json!({
                "name": state.publisher.queue(),
                "depth": queue_depth.map(|(routine, urgent)| routine + urgent),
                "urgent": {
                    "name": state.publisher.urgent_queue(),
                    "depth": queue_depth.map(|(_, urgent)| urgent),
                },
            })
        } else {
            Value::Null
        },
        "backends": backends,
        "workers": workers,
    })))
}

/// Messages ready in the job queue and in the urgent queue, asked over the API's
/// publishing connection; `None` when the broker cannot be asked right now.
async fn queue_depth(state: &AppState) -> Option<(u32, u32)> {
    tokio::time::timeout(BROKER_TIMEOUT, state.publisher.queue_depths())
        .await
        .ok()
        .and_then(Result::ok)
}
