//! Cron schedules and their firings: parsing cron expressions, deciding which fire times
//! are due (and which were missed), and every query on `schedules` and `schedule_runs`.
//!
//! Exactly-once firing rests on the unique key `(schedule, fire_time)` of
//! `schedule_runs`: a replica claims a firing by inserting its row with
//! `ON CONFLICT DO NOTHING RETURNING`, and only the replica that got the row back runs it.
//! The claim pass also locks the schedule rows it looks at with `FOR UPDATE SKIP LOCKED`,
//! so replicas do not even compete for the same schedule at the same moment.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::Serialize;
use serde_json::Value;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// The most missed fire times recorded as `skipped` for one schedule in one pass; older
/// ones are only counted (in the catch-up run's output), so a 1-second schedule that was
/// down for a day does not write 86,400 rows at once.
pub const MAX_SKIPPED_RECORDED: usize = 1000;

/// A firing whose runner has not said it is alive for this long is presumed abandoned
/// (its scheduler crashed) and marked failed, so the schedule can fire again.
pub const RUN_HEARTBEAT_STALE: Duration = Duration::from_secs(30);

/// With `catch_up = 'none'`, a fire time this late is still run (it is merely the normal
/// latency of a scheduler pass), not skipped.
pub const ON_TIME_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("invalid cron expression '{expr}': {reason}")]
    Cron { expr: String, reason: String },
    #[error("cron expression '{0}' never fires")]
    NeverFires(String),
}

/// Parses a standard 5-field cron expression, or 6 fields with seconds first. Times are
/// evaluated in UTC.
pub fn parse_cron(expr: &str) -> Result<Cron, ScheduleError> {
    let trimmed = expr.trim();
    if trimmed.is_empty() || trimmed.len() > 200 {
        return Err(ScheduleError::Cron {
            expr: expr.to_owned(),
            reason: "expected 5 fields (minute hour day month weekday) or 6 with seconds first"
                .into(),
        });
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|e| ScheduleError::Cron {
            expr: expr.to_owned(),
            reason: e.to_string(),
        })?;
    // An expression such as "0 0 31 2 *" parses but never matches.
    cron.find_next_occurrence(&Utc::now(), false)
        .map_err(|_| ScheduleError::NeverFires(expr.to_owned()))?;
    Ok(cron)
}

/// What happens to fire times missed while no scheduler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Run the most recent missed fire time once; record older ones as skipped.
    Latest,
    /// Record every missed fire time as skipped.
    None,
}

impl CatchUp {
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::Latest => "latest",
            CatchUp::None => "none",
        }
    }
}

impl FromStr for CatchUp {
    type Err = crate::model::UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "latest" => Ok(CatchUp::Latest),
            "none" => Ok(CatchUp::None),
            other => Err(crate::model::UnknownVariant(other.to_owned())),
        }
    }
}

/// The tasks a schedule can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Task {
    HealthCheck,
    IndexUpdate,
    Prune,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::HealthCheck => "health-check",
            Task::IndexUpdate => "index-update",
            Task::Prune => "prune",
        }
    }
}

impl FromStr for Task {
    type Err = crate::model::UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "health-check" => Ok(Task::HealthCheck),
            "index-update" => Ok(Task::IndexUpdate),
            "prune" => Ok(Task::Prune),
            other => Err(crate::model::UnknownVariant(other.to_owned())),
        }
    }
}

/// Which fire times a pass must act on for one schedule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The fire time to run now, if any.
    pub due: Option<DateTime<Utc>>,
    /// Missed fire times to record as skipped (oldest first, at most
    /// [`MAX_SKIPPED_RECORDED`]).
    pub skipped: Vec<DateTime<Utc>>,
    /// Missed fire times beyond those recorded.
    pub skipped_unrecorded: u64,
    /// The latest fire time this plan accounts for; becomes `last_fire_at`.
    pub advance_to: Option<DateTime<Utc>>,
}

/// Decides what is due for a schedule at `now`.
///
/// `last_fire` is the latest fire time already claimed. A schedule that never fired
/// (`None`) runs its latest fire time at or after `since` (its creation or last edit),
/// and records nothing as skipped: times before it existed were not missed.
pub fn plan(
    cron: &Cron,
    last_fire: Option<DateTime<Utc>>,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    catch_up: CatchUp,
) -> Plan {
    let Ok(latest) = cron.find_previous_occurrence(&now, true) else {
        return Plan::default();
    };
    let floor = last_fire.unwrap_or(since);
    let first_time = last_fire.is_none();
    if latest <= floor && !(first_time && latest == floor) {
        return Plan::default();
    }
    let mut plan = Plan {
        advance_to: Some(latest),
        ..Plan::default()
    };
    if !first_time {
        for t in cron.clone().iter_after(floor) {
            if t >= latest {
                break;
            }
            if plan.skipped.len() < MAX_SKIPPED_RECORDED {
                plan.skipped.push(t);
            } else {
                plan.skipped_unrecorded += 1;
                // Counting a day of 1-second firings is cheap; beyond that, stop counting.
                if plan.skipped_unrecorded >= 1_000_000 {
                    break;
                }
            }
        }
    }
    let late = (now - latest).to_std().unwrap_or_default();
    match catch_up {
        CatchUp::Latest => plan.due = Some(latest),
        CatchUp::None if late <= ON_TIME_GRACE => plan.due = Some(latest),
        CatchUp::None => plan.skipped.push(latest),
    }
    plan
}

/// The next fire time after the latest claimed one (or after `now` when it never fired).
/// In the past when a firing is overdue.
pub fn next_fire(
    cron: &Cron,
    last_fire: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let from = last_fire.unwrap_or(now);
    cron.find_next_occurrence(&from, false).ok()
}

// ---------------------------------------------------------------------------------------
// Rows

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Schedule {
    pub name: String,
    pub cron: String,
    pub task: String,
    pub args: sqlx::types::Json<Value>,
    pub enabled: bool,
    pub catch_up: String,
    pub last_fire_at: Option<DateTime<Utc>>,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SCHEDULE_COLUMNS: &str =
    "name, cron, task, args, enabled, catch_up, last_fire_at, next_fire_at, created_at, updated_at";

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Run {
    pub id: i64,
    pub schedule: String,
    pub fire_time: DateTime<Utc>,
    pub manual: bool,
    pub status: String,
    pub runner: Option<Uuid>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub output: sqlx::types::Json<Value>,
    pub error: Option<String>,
}

const RUN_COLUMNS: &str =
    "id, schedule, fire_time, manual, status, runner, started_at, finished_at, output, error";

/// A firing this process claimed and must run.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub run_id: i64,
    pub schedule: String,
    pub task: String,
    pub args: Value,
    pub fire_time: DateTime<Utc>,
    pub manual: bool,
}

// ---------------------------------------------------------------------------------------
// Reads and edits (API)

pub async fn list(pool: &PgPool) -> Result<Vec<Schedule>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name"
    )))
    .fetch_all(pool)
    .await
}

pub async fn get(pool: &PgPool, name: &str) -> Result<Option<Schedule>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = $1"
    )))
    .bind(name)
    .fetch_optional(pool)
    .await
}

/// The latest run of each schedule that is not merely `skipped` or `pending`.
pub async fn last_runs(pool: &PgPool) -> Result<Vec<Run>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM schedules s
         CROSS JOIN LATERAL (
             SELECT * FROM schedule_runs r
             WHERE r.schedule = s.name AND r.status IN ('running', 'succeeded', 'failed')
             ORDER BY r.fire_time DESC LIMIT 1) r"
    )))
    .fetch_all(pool)
    .await
}

/// Run counts per schedule and status (the numbers a metrics endpoint exports).
pub async fn run_counts(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT schedule, status, count(*) FROM schedule_runs GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
}

/// A change to a schedule. Changing the expression, or enabling a disabled schedule,
/// re-anchors it at now: fire times of the old expression, or of the time it was
/// disabled, are not caught up.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    pub cron: Option<String>,
    pub enabled: Option<bool>,
    pub catch_up: Option<CatchUp>,
    pub args: Option<Value>,
}

pub async fn update(
    pool: &PgPool,
    name: &str,
    patch: &Patch,
) -> Result<Option<Schedule>, sqlx::Error> {
    let next = match &patch.cron {
        Some(expr) => parse_cron(expr)
            .ok()
            .and_then(|c| c.find_next_occurrence(&Utc::now(), false).ok()),
        None => None,
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE schedules SET
             last_fire_at = CASE
                 WHEN ($2::text IS NOT NULL AND $2 <> cron) OR ($3::boolean AND NOT enabled)
                 THEN greatest(last_fire_at, now()) ELSE last_fire_at END,
             next_fire_at = CASE WHEN $2::text IS NOT NULL THEN $6 ELSE next_fire_at END,
             cron = coalesce($2, cron),
             enabled = coalesce($3, enabled),
             catch_up = coalesce($4, catch_up),
             args = coalesce($5, args),
             updated_at = now()
         WHERE name = $1
         RETURNING {SCHEDULE_COLUMNS}"
    )))
    .bind(name)
    .bind(&patch.cron)
    .bind(patch.enabled)
    .bind(patch.catch_up.map(CatchUp::as_str))
    .bind(patch.args.as_ref().map(sqlx::types::Json))
    .bind(next)
    .fetch_optional(pool)
    .await
}

/// Asks for a run now. A scheduler picks it up on its next pass (recorded as manual).
pub async fn request_run(pool: &PgPool, name: &str) -> Result<Option<Run>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO schedule_runs (schedule, fire_time, manual, status)
         SELECT name, clock_timestamp(), true, 'pending' FROM schedules WHERE name = $1
         RETURNING {RUN_COLUMNS}"
    )))
    .bind(name)
    .fetch_optional(pool)
    .await
}

pub async fn run_by_id(pool: &PgPool, id: i64) -> Result<Option<Run>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM schedule_runs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Runs of a schedule, newest fire time first, optionally only one status and only
/// before a fire time (for paging).
pub async fn runs(
    pool: &PgPool,
    name: &str,
    status: Option<&str>,
    before: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<Run>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM schedule_runs
         WHERE schedule = $1 AND ($2::text IS NULL OR status = $2)
           AND ($3::timestamptz IS NULL OR fire_time < $3)
         ORDER BY fire_time DESC LIMIT $4"
    )))
    .bind(name)
    .bind(status)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

// ---------------------------------------------------------------------------------------
// The scheduler's side

/// Claims every due firing of every enabled schedule: records missed fire times as
/// skipped, inserts the due one as `running` for `runner`, and advances `last_fire_at`,
/// all in one transaction. A schedule with a live run still going is left alone this pass
/// (its due fire time stays due and is caught up once the run ends), so a slow task never
/// overlaps itself.
pub async fn claim_due(pool: &PgPool, runner: Uuid) -> Result<Vec<Claimed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    let rows: Vec<Schedule> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules s
         WHERE enabled
           -- Every pass stores the next fire time, so a schedule that is not due yet is not
           -- locked and rewritten on every tick (one that never fired included).
           AND (next_fire_at IS NULL OR next_fire_at <= $1)
           AND NOT EXISTS (SELECT 1 FROM schedule_runs r
                           WHERE r.schedule = s.name AND r.status = 'running')
         ORDER BY name
         FOR UPDATE SKIP LOCKED"
    )))
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let mut claimed = Vec::new();
    for s in rows {
        let cron = match parse_cron(&s.cron) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(schedule = %s.name, error = %e, "schedule has an invalid cron expression; not firing it");
                continue;
            }
        };
        let catch_up = s.catch_up.parse().unwrap_or(CatchUp::Latest);
        let p = plan(&cron, s.last_fire_at, s.updated_at, now, catch_up);
        if !p.skipped.is_empty() {
            sqlx::query(
                "INSERT INTO schedule_runs (schedule, fire_time, status, runner, finished_at, output)
                 SELECT $1, t, 'skipped', $3, now(),
                        jsonb_build_object('reason', 'missed while no scheduler was running')
                 FROM unnest($2::timestamptz[]) AS t
                 ON CONFLICT (schedule, fire_time) DO NOTHING",
            )
            .bind(&s.name)
            .bind(&p.skipped)
            .bind(runner)
            .execute(&mut *tx)
            .await?;
            tracing::warn!(schedule = %s.name, skipped = p.skipped.len() as u64 + p.skipped_unrecorded, "recorded missed fire times as skipped");
        }
        if let Some(due) = p.due {
            let output = if p.skipped_unrecorded > 0 {
                serde_json::json!({ "skipped_unrecorded": p.skipped_unrecorded })
            } else {
                serde_json::json!({})
            };
            let id: Option<i64> = sqlx::query_scalar(
                "INSERT INTO schedule_runs (schedule, fire_time, status, runner, heartbeat_at, started_at, output)
                 VALUES ($1, $2, 'running', $3, now(), clock_timestamp(), $4)
                 ON CONFLICT (schedule, fire_time) DO NOTHING
                 RETURNING id",
            )
            .bind(&s.name)
            .bind(due)
            .bind(runner)
            .bind(sqlx::types::Json(&output))
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(run_id) = id {
                claimed.push(Claimed {
                    run_id,
                    schedule: s.name.clone(),
                    task: s.task.clone(),
                    args: s.args.0.clone(),
                    fire_time: due,
                    manual: false,
                });
            }
        }
        let last = match (s.last_fire_at, p.advance_to) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let next = next_fire(&cron, last, now);
        sqlx::query("UPDATE schedules SET last_fire_at = $2, next_fire_at = $3 WHERE name = $1")
            .bind(&s.name)
            .bind(last)
            .bind(next)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(claimed)
}

/// Claims manual runs asked for through the API.
pub async fn claim_manual(
    pool: &PgPool,
    runner: Uuid,
    limit: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    type Row = (i64, String, DateTime<Utc>, String, sqlx::types::Json<Value>);
    let rows: Vec<Row> = sqlx::query_as(
        "WITH picked AS (
             SELECT id FROM schedule_runs WHERE status = 'pending'
             ORDER BY fire_time LIMIT $2 FOR UPDATE SKIP LOCKED)
         UPDATE schedule_runs r
         SET status = 'running', runner = $1, heartbeat_at = now(), started_at = clock_timestamp()
         FROM picked, schedules s
         WHERE r.id = picked.id AND s.name = r.schedule
         RETURNING r.id, r.schedule, r.fire_time, s.task, s.args",
    )
    .bind(runner)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(run_id, schedule, fire_time, task, args)| Claimed {
            run_id,
            schedule,
            task,
            args: args.0,
            fire_time,
            manual: true,
        })
        .collect())
}

/// Says that these firings of this runner are still going.
pub async fn heartbeat(pool: &PgPool, runner: Uuid, run_ids: &[i64]) -> Result<u64, sqlx::Error> {
    if run_ids.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query(
        "UPDATE schedule_runs SET heartbeat_at = now()
         WHERE id = ANY($2) AND runner = $1 AND status = 'running'",
    )
    .bind(runner)
    .bind(run_ids)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Marks firings whose runner stopped saying it is alive as failed, so their schedules
/// fire again. Returns how many.
pub async fn reap_abandoned(pool: &PgPool, stale: Duration) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE schedule_runs SET status = 'failed', finished_at = now(),
                error = 'abandoned: its scheduler stopped without finishing it'
         WHERE status = 'running' AND heartbeat_at < now() - make_interval(secs => $1)",
    )
    .bind(stale.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Records how a firing ended: its output summary, and an error if it failed. Fenced by
/// runner, so a firing reaped as abandoned is not overwritten by a late finisher.
pub async fn finish(
    pool: &PgPool,
    run_id: i64,
    runner: Uuid,
    output: &Value,
    error: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let status = if error.is_some() {
        "failed"
    } else {
        "succeeded"
    };
    let r = sqlx::query(
        "UPDATE schedule_runs SET status = $3, finished_at = clock_timestamp(),
                output = output || $4, error = $5
         WHERE id = $1 AND runner = $2 AND status = 'running'",
    )
    .bind(run_id)
    .bind(runner)
    .bind(status)
    .bind(sqlx::types::Json(output))
    .bind(error)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Marks this runner's firings still running as failed with `reason` (on shutdown, once
/// the grace period is over).
pub async fn fail_own_running(
    pool: &PgPool,
    runner: Uuid,
    reason: &str,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE schedule_runs SET status = 'failed', finished_at = now(), error = $2
         WHERE runner = $1 AND status = 'running'",
    )
    .bind(runner)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, h, m, s)
            .single()
            .unwrap_or_default()
    }

    #[test]
    fn parses_five_and_six_fields() {
        assert!(parse_cron("*/10 * * * *").is_ok());
        assert!(parse_cron("*/30 * * * * *").is_ok());
        assert!(parse_cron("0 0 * * * *").is_ok());
        assert!(parse_cron("").is_err());
        assert!(parse_cron("every minute").is_err());
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("* * * * * * 2030").is_err(), "no year field");
    }

    #[test]
    fn five_fields_fire_on_the_minute() {
        let c = parse_cron("*/10 * * * *").unwrap();
        assert_eq!(
            next_fire(&c, Some(t(10, 0, 0)), t(10, 0, 0)),
            Some(t(10, 10, 0))
        );
    }

    #[test]
    fn on_time_firing_has_nothing_skipped() {
        let c = parse_cron("* * * * * *").unwrap();
        let p = plan(
            &c,
            Some(t(10, 0, 0)),
            t(9, 0, 0),
            t(10, 0, 1),
            CatchUp::Latest,
        );
        assert_eq!(p.due, Some(t(10, 0, 1)));
        assert!(p.skipped.is_empty());
        assert_eq!(p.advance_to, Some(t(10, 0, 1)));
    }

    #[test]
    fn nothing_due_before_the_next_fire_time() {
        let c = parse_cron("*/30 * * * * *").unwrap();
        let p = plan(
            &c,
            Some(t(10, 0, 0)),
            t(9, 0, 0),
            t(10, 0, 29),
            CatchUp::Latest,
        );
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn after_downtime_the_latest_runs_and_older_are_skipped() {
        let c = parse_cron("*/30 * * * * *").unwrap();
        let p = plan(
            &c,
            Some(t(10, 0, 0)),
            t(9, 0, 0),
            t(10, 2, 10),
            CatchUp::Latest,
        );
        assert_eq!(p.due, Some(t(10, 2, 0)));
        assert_eq!(p.skipped, vec![t(10, 0, 30), t(10, 1, 0), t(10, 1, 30)]);
        assert_eq!(p.advance_to, Some(t(10, 2, 0)));
    }

    #[test]
    fn catch_up_none_skips_the_late_latest_too() {
        let c = parse_cron("*/30 * * * * *").unwrap();
        let p = plan(
            &c,
            Some(t(10, 0, 0)),
            t(9, 0, 0),
            t(10, 1, 20),
            CatchUp::None,
        );
        assert_eq!(p.due, None);
        assert_eq!(p.skipped, vec![t(10, 0, 30), t(10, 1, 0)]);
        // Still runs a firing that is merely a pass late.
        let p = plan(
            &c,
            Some(t(10, 0, 0)),
            t(9, 0, 0),
            t(10, 0, 31),
            CatchUp::None,
        );
        assert_eq!(p.due, Some(t(10, 0, 30)));
    }

    #[test]
    fn a_new_schedule_skips_nothing_before_it_existed() {
        let c = parse_cron("*/30 * * * * *").unwrap();
        // Created at 10:00:10: the 10:00:30 fire time is its first.
        let p = plan(&c, None, t(10, 0, 10), t(10, 0, 20), CatchUp::Latest);
        assert_eq!(p, Plan::default());
        let p = plan(&c, None, t(10, 0, 10), t(10, 5, 0), CatchUp::Latest);
        assert_eq!(p.due, Some(t(10, 5, 0)));
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn long_outages_record_a_bounded_number_of_skips() {
        let c = parse_cron("* * * * * *").unwrap();
        let p = plan(
            &c,
            Some(t(10, 0, 0)),
            t(9, 0, 0),
            t(12, 0, 0),
            CatchUp::Latest,
        );
        assert_eq!(p.due, Some(t(12, 0, 0)));
        assert_eq!(p.skipped.len(), MAX_SKIPPED_RECORDED);
        assert_eq!(p.skipped.len() as u64 + p.skipped_unrecorded, 2 * 3600 - 1);
    }
}
