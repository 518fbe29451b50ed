//! Liveness and readiness. Neither needs a token, so orchestrators can probe them.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::AppState;

/// The process is up and serving.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// PostgreSQL answers and RabbitMQ accepts a connection.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let db = tokio::time::timeout(
        Duration::from_secs(3),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await;
    let db_ok = matches!(db, Ok(Ok(_)));
    let broker_ok =
        tokio::time::timeout(Duration::from_secs(3), state.publisher.ensure_connected())
            .await
            .is_ok_and(|r| r.is_ok());
    let ready = db_ok && broker_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {"postgres": word(db_ok), "rabbitmq": word(broker_ok)},
        })),
    )
}
