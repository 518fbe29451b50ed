//! Backend health: the status rules with hysteresis, and every query on probes and the
//! health columns of `backends`.
//!
//! A backend is `healthy`, `degraded` (a probe was slow, or failed fewer than
//! `down_after` times in a row) or `down` (`down_after` consecutive failures). A `down`
//! backend only counts as up again after `healthy_after` consecutive good probes, and a
//! `degraded` one only becomes `healthy` after as many, so one blip or one lucky probe
//! does not flap the status. Workers read `backends.status` to defer jobs for down
//! backends.

use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::kubo::KuboClient;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Unknown,
    Healthy,
    Degraded,
    Down,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Down => "down",
        }
    }
}

impl FromStr for Status {
    type Err = crate::model::UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "unknown" => Ok(Status::Unknown),
            "healthy" => Ok(Status::Healthy),
            "degraded" => Ok(Status::Degraded),
            "down" => Ok(Status::Down),
            other => Err(crate::model::UnknownVariant(other.to_owned())),
        }
    }
}

/// The hysteresis thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive failed probes that make a backend `down` (at least 1).
    pub down_after: u32,
    /// Consecutive good probes that make a `down` or `degraded` backend `healthy` again.
    pub healthy_after: u32,
    /// A good probe slower than this counts as `degraded`.
    pub slow: Duration,
}

/// A backend's health state: its status and the run lengths that decide the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub status: Status,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    Ok { latency: Duration },
    Failed,
}

/// The health after one more probe.
pub fn next(h: Health, probe: ProbeOutcome, t: Thresholds) -> Health {
    match probe {
        ProbeOutcome::Failed => {
            let fails = h.consecutive_failures.saturating_add(1);
            let status = if fails >= t.down_after.max(1) || h.status == Status::Down {
                Status::Down
            } else {
                Status::Degraded
            };
            Health {
                status,
                consecutive_failures: fails,
                consecutive_successes: 0,
            }
        }
        ProbeOutcome::Ok { latency } => {
            let oks = h.consecutive_successes.saturating_add(1);
            let slow = latency > t.slow;
            let recovered = oks >= t.healthy_after.max(1);
            let status = match h.status {
                // The first probe of a new backend sets its status at once.
                Status::Unknown | Status::Healthy if slow => Status::Degraded,
                Status::Unknown | Status::Healthy => Status::Healthy,
                Status::Down if !recovered => Status::Down,
                Status::Degraded if !recovered => Status::Degraded,
                Status::Down | Status::Degraded if slow => Status::Degraded,
                Status::Down | Status::Degraded => Status::Healthy,
            };
            Health {
                status,
                consecutive_failures: 0,
                consecutive_successes: oks,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Queries

/// What a probe found, ready to record.
#[derive(Debug, Clone, Default)]
pub struct ProbeRecord {
    pub ok: bool,
    pub latency_ms: i32,
    pub error: Option<String>,
    pub peer_id: Option<String>,
    pub node_version: Option<String>,
    pub repo_size: Option<i64>,
    pub num_objects: Option<i64>,
}

/// An enabled backend to probe.
#[derive(Debug, Clone, FromRow)]
pub struct ProbeTarget {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    pub url: String,
}

pub async fn probe_targets(pool: &PgPool) -> Result<Vec<ProbeTarget>, sqlx::Error> {
    sqlx::query_as("SELECT id, name, kind, url FROM backends WHERE enabled ORDER BY name")
        .fetch_all(pool)
        .await
}

/// Records a probe and moves the backend's status by [`next`], in one transaction (the
/// probe itself ran before: no transaction is held across a backend call). Returns the
/// status before and after.
pub async fn record_probe(
    pool: &PgPool,
    backend_id: Uuid,
    probe: &ProbeRecord,
    thresholds: Thresholds,
) -> Result<Option<(Status, Status)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, i32, i32)> = sqlx::query_as(
        "SELECT status, consecutive_failures, consecutive_successes FROM backends
         WHERE id = $1 FOR UPDATE",
    )
    .bind(backend_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((status, fails, oks)) = row else {
        tx.rollback().await?;
        return Ok(None);
    };
    let before = Health {
        status: status.parse().unwrap_or(Status::Unknown),
        consecutive_failures: u32::try_from(fails).unwrap_or(0),
        consecutive_successes: u32::try_from(oks).unwrap_or(0),
    };
    let outcome = if probe.ok {
        ProbeOutcome::Ok {
            latency: Duration::from_millis(u64::try_from(probe.latency_ms).unwrap_or(0)),
        }
    } else {
        ProbeOutcome::Failed
    };
    let after = next(before, outcome, thresholds);
    sqlx::query(
        "UPDATE backends SET
             status = $2,
             status_since = CASE WHEN status <> $2 THEN now() ELSE status_since END,
             consecutive_failures = $3, consecutive_successes = $4,
             last_probe_at = now(), last_probe_ok = $5, last_probe_latency_ms = $6,
             last_probe_error = $7,
             node_version = coalesce($8, node_version),
             repo_size = coalesce($9, repo_size),
             num_objects = coalesce($10, num_objects)
         WHERE id = $1",
    )
    .bind(backend_id)
    .bind(after.status.as_str())
    .bind(i32::try_from(after.consecutive_failures).unwrap_or(i32::MAX))
    .bind(i32::try_from(after.consecutive_successes).unwrap_or(i32::MAX))
    .bind(probe.ok)
    .bind(probe.latency_ms)
    .bind(&probe.error)
    .bind(&probe.node_version)
    .bind(probe.repo_size)
    .bind(probe.num_objects)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO backend_probes
             (backend_id, ok, latency_ms, error, peer_id, node_version, repo_size, num_objects, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(backend_id)
    .bind(probe.ok)
    .bind(probe.latency_ms)
    .bind(&probe.error)
    .bind(&probe.peer_id)
    .bind(&probe.node_version)
    .bind(probe.repo_size)
    .bind(probe.num_objects)
    .bind(after.status.as_str())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some((before.status, after.status)))
}

/// One recorded probe.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct Probe {
    pub probed_at: DateTime<Utc>,
    pub ok: bool,
    pub latency_ms: i32,
    pub error: Option<String>,
    pub peer_id: Option<String>,
    pub node_version: Option<String>,
    pub repo_size: Option<i64>,
    pub num_objects: Option<i64>,
    pub status: String,
}

/// A backend's current health, as the API shows it.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct BackendHealth {
    #[serde(skip)]
    pub id: Uuid,
    #[serde(skip)]
    pub name: String,
    pub status: String,
    pub status_since: DateTime<Utc>,
    pub consecutive_failures: i32,
    pub consecutive_successes: i32,
    pub node_version: Option<String>,
    pub repo_size: Option<i64>,
    pub num_objects: Option<i64>,
    pub last_probe_at: Option<DateTime<Utc>>,
    pub last_probe_ok: Option<bool>,
    pub last_probe_latency_ms: Option<i32>,
    pub last_probe_error: Option<String>,
}

const HEALTH_COLUMNS: &str =
    "id, name, status, status_since, consecutive_failures, consecutive_successes,
     node_version, repo_size, num_objects, last_probe_at, last_probe_ok, last_probe_latency_ms,
     last_probe_error";

pub async fn all_backend_health(pool: &PgPool) -> Result<Vec<BackendHealth>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {HEALTH_COLUMNS} FROM backends ORDER BY name"
    )))
    .fetch_all(pool)
    .await
}

pub async fn backend_health(
    pool: &PgPool,
    name: &str,
) -> Result<Option<BackendHealth>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {HEALTH_COLUMNS} FROM backends WHERE name = $1"
    )))
    .bind(name)
    .fetch_optional(pool)
    .await
}

/// A backend's probes, newest first.
pub async fn probes(
    pool: &PgPool,
    backend_id: Uuid,
    before: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<Probe>, sqlx::Error> {
    sqlx::query_as(
        "SELECT probed_at, ok, latency_ms, error, peer_id, node_version, repo_size, num_objects, status
         FROM backend_probes
         WHERE backend_id = $1 AND ($2::timestamptz IS NULL OR probed_at < $2)
         ORDER BY probed_at DESC LIMIT $3",
    )
    .bind(backend_id)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Probes a Kubo backend within `timeout`: `id` and `version` decide whether it is up;
/// `repo/stat` is asked at the same time for the repository figures, and reported if it
/// answers before the deadline. A node walks its whole blockstore to answer `repo/stat`
/// (js-ipfs does, and Kubo without `size-only`), so under load it can take longer than
/// the probe's timeout while the node pins normally; it must not take a busy node down.
/// Used by the scheduler's `health-check` task and by the API's "check now". Record the
/// result with [`record_probe`].
pub async fn probe_kubo(http: reqwest::Client, url: &str, timeout: Duration) -> ProbeRecord {
    let client = KuboClient::new(http, url);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let stat = {
        let client = client.clone();
        tokio::spawn(async move { client.repo_stat().await })
    };
    let alive = async { tokio::try_join!(client.id(), client.version()) };
    let result = tokio::time::timeout_at(deadline, alive).await;
    let latency_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
    match result {
        Ok(Ok((id, version))) => {
            let abort = stat.abort_handle();
            let stat = match tokio::time::timeout_at(deadline, stat).await {
                Ok(Ok(Ok(stat))) => Some(stat),
                _ => None,
            };
            abort.abort();
            ProbeRecord {
                ok: true,
                latency_ms,
                error: None,
                peer_id: Some(id.id),
                node_version: Some(version),
                repo_size: stat.as_ref().and_then(|s| i64::try_from(s.repo_size).ok()),
                num_objects: stat
                    .as_ref()
                    .and_then(|s| i64::try_from(s.num_objects).ok()),
            }
        }
        Ok(Err(e)) => {
            stat.abort();
            ProbeRecord {
                ok: false,
                latency_ms,
                error: Some(e.to_string()),
                ..ProbeRecord::default()
            }
        }
        Err(_) => {
            stat.abort();
            ProbeRecord {
                ok: false,
                latency_ms,
                error: Some(format!("probe timed out after {} ms", timeout.as_millis())),
                ..ProbeRecord::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        down_after: 2,
        healthy_after: 2,
        slow: Duration::from_millis(1000),
    };
    const FAST: ProbeOutcome = ProbeOutcome::Ok {
        latency: Duration::from_millis(20),
    };
    const SLOW: ProbeOutcome = ProbeOutcome::Ok {
        latency: Duration::from_millis(1500),
    };
    const FAIL: ProbeOutcome = ProbeOutcome::Failed;

    fn run(start: Status, probes: &[ProbeOutcome]) -> Vec<Status> {
        let mut h = Health {
            status: start,
            consecutive_failures: 0,
            consecutive_successes: 0,
        };
        probes
            .iter()
            .map(|p| {
                h = next(h, *p, T);
                h.status
            })
            .collect()
    }

    use Status::*;

    #[test]
    fn first_probe_sets_the_status() {
        assert_eq!(run(Unknown, &[FAST]), vec![Healthy]);
        assert_eq!(run(Unknown, &[SLOW]), vec![Degraded]);
        assert_eq!(run(Unknown, &[FAIL]), vec![Degraded]);
    }

    #[test]
    fn one_blip_degrades_but_does_not_take_it_down() {
        assert_eq!(
            run(Healthy, &[FAIL, FAST, FAST]),
            vec![Degraded, Degraded, Healthy]
        );
    }

    #[test]
    fn consecutive_failures_take_it_down() {
        assert_eq!(
            run(Healthy, &[FAIL, FAIL, FAIL]),
            vec![Degraded, Down, Down]
        );
    }

    #[test]
    fn recovery_needs_consecutive_successes() {
        assert_eq!(
            run(Healthy, &[FAIL, FAIL, FAST, FAIL, FAST, FAST]),
            vec![Degraded, Down, Down, Down, Down, Healthy]
        );
    }

    #[test]
    fn slow_probes_degrade_and_slow_recovery_stays_degraded() {
        assert_eq!(
            run(Healthy, &[SLOW, FAST, FAST]),
            vec![Degraded, Healthy, Healthy]
        );
        assert_eq!(run(Down, &[SLOW, SLOW]), vec![Down, Degraded]);
    }

    #[test]
    fn statuses_round_trip() {
        for s in [Unknown, Healthy, Degraded, Down] {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
    }
}
