//! The tasks a schedule can run. Each returns an output summary (counts) recorded in the
//! firing's `schedule_runs.output`, and an error when it failed (possibly after doing part
//! of its work, which the output then describes).

mod health;
mod index;
mod prune;

use pinq_core::config::SchedulerArgs;
use pinq_core::schedule::Task;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// What a task works with.
pub struct TaskCtx {
    pub pool: PgPool,
    pub settings: SchedulerArgs,
    pub http: reqwest::Client,
    /// The firing being run (recorded on what the task creates, e.g. repair jobs).
    pub run_id: i64,
    /// Cancelled when the scheduler stops; long tasks check it between chunks.
    pub shutdown: CancellationToken,
}

/// How a task ended.
pub struct TaskOutcome {
    pub output: Value,
    pub error: Option<String>,
}

impl TaskOutcome {
    fn ok(output: Value) -> Self {
        TaskOutcome {
            output,
            error: None,
        }
    }

    fn from_result(r: anyhow::Result<Value>) -> Self {
        match r {
            Ok(output) => TaskOutcome::ok(output),
            Err(e) => TaskOutcome {
                output: json!({}),
                error: Some(format!("{e:#}")),
            },
        }
    }
}

pub async fn run(ctx: &TaskCtx, task: &str, args: &Value) -> TaskOutcome {
    match task.parse::<Task>() {
        Ok(Task::HealthCheck) => TaskOutcome::from_result(health::run(ctx).await),
        Ok(Task::IndexUpdate) => index::run(ctx, args).await,
        Ok(Task::Prune) => TaskOutcome::from_result(prune::run(ctx, args).await),
        Err(_) => TaskOutcome {
            output: json!({}),
            error: Some(format!("unknown task '{task}'")),
        },
    }
}

/// An integer option from a schedule's `args`, clamped to a sane range.
fn arg_i64(args: &Value, key: &str, default: i64, min: i64, max: i64) -> i64 {
    args.get(key)
        .and_then(Value::as_i64)
        .unwrap_or(default)
        .clamp(min, max)
}
