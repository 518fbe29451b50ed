//! `index-update`: reconciles pinq's pin index with each backend's recursive pins.
//!
//! The backend's `pin/ls` is streamed and its CIDs, canonicalized, are copied in chunks
//! into a session-local temporary table; the comparison with `pins` is then set-based
//! SQL. The scheduler never holds more than one chunk of CIDs, whatever the pin count.
//!
//! - index `pinned`, on the node: verified. The row is not written: the listing's start is
//!   recorded once, on the backend (`backends.pins_listed_at`), and a pin's verification
//!   time is the later of its own `verified_at` and that mark ([`pinq_core::stats`]).
//!   Rows that stay `pinned` or `unmanaged` without being listed are flagged `unlisted`,
//!   so that the mark does not speak for them.
//! - index `pinned`, not on the node: marked `missing`, and a repair pin job (low
//!   priority, owned by the pin's owner) is created unless a job for that CID is pending.
//! - on the node, unknown to the index: recorded with status `unmanaged` (no owner).
//!
//! Rows changed since the listing began are left alone (a job may have just pinned or
//! unpinned them), and so are CIDs with a pending job: the next run looks again.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use pinq_core::cid::canonical_of;
use pinq_core::db;
use pinq_core::kubo::KuboClient;
use serde_json::{Map, Value, json};
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use super::{TaskCtx, TaskOutcome, arg_i64};

/// Missing pins turned into repair jobs per transaction.
const REPAIR_CHUNK: i64 = 1000;

#[derive(Debug, Clone, FromRow)]
struct Target {
    id: Uuid,
    name: String,
    kind: String,
    url: String,
    status: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    listed: u64,
    unparsable: u64,
    verified: u64,
    restored: u64,
    missing: u64,
    newly_missing: u64,
    repaired: u64,
    unmanaged: u64,
    new_unmanaged: u64,
    unmanaged_gone: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.listed += o.listed;
        self.unparsable += o.unparsable;
        self.verified += o.verified;
        self.restored += o.restored;
        self.missing += o.missing;
        self.newly_missing += o.newly_missing;
        self.repaired += o.repaired;
        self.unmanaged += o.unmanaged;
        self.new_unmanaged += o.new_unmanaged;
        self.unmanaged_gone += o.unmanaged_gone;
    }

    fn json(&self) -> Value {
        json!({
            "listed": self.listed,
            "unparsable": self.unparsable,
            "verified": self.verified,
            "restored": self.restored,
            "missing": self.missing,
            "newly_missing": self.newly_missing,
            "repaired": self.repaired,
            "unmanaged": self.unmanaged,
            "new_unmanaged": self.new_unmanaged,
            "unmanaged_gone": self.unmanaged_gone,
        })
    }
}

pub async fn run(ctx: &TaskCtx, args: &Value) -> TaskOutcome {
    let chunk = usize::try_from(arg_i64(args, "chunk_size", 5000, 100, 50_000)).unwrap_or(5000);
    let priority = arg_i64(args, "repair_priority", 1, 0, 9) as i16;
    let targets: Vec<Target> = match sqlx::query_as(
        "SELECT id, name, kind, url, status FROM backends WHERE enabled ORDER BY name",
    )
    .fetch_all(&ctx.pool)
    .await
    {
        Ok(t) => t,
        Err(e) => {
            return TaskOutcome {
                output: json!({}),
                error: Some(format!("could not list backends: {e}")),
            };
        }
    };
    let mut total = Counts::default();
    let mut per_backend = Map::new();
    let mut errors = Vec::new();
    for t in targets {
        if t.kind != "kubo" {
            per_backend.insert(
                t.name.clone(),
                json!({"skipped": format!("kind '{}' is not supported yet", t.kind)}),
            );
            continue;
        }
        if t.status == "down" {
            per_backend.insert(t.name.clone(), json!({"skipped": "the backend is down"}));
            continue;
        }
        match reconcile(ctx, &t, chunk, priority).await {
            Ok(None) => {
                tracing::info!(backend = %t.name, "a listing begun later has been reconciled already; this one is dropped");
                per_backend.insert(
                    t.name.clone(),
                    json!({"skipped": "a listing begun later has been reconciled already"}),
                );
            }
            Ok(Some(c)) => {
                tracing::info!(backend = %t.name, listed = c.listed, verified = c.verified, missing = c.missing, repaired = c.repaired, unmanaged = c.unmanaged, "pin index reconciled");
                total.add(&c);
                per_backend.insert(t.name.clone(), c.json());
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(backend = %t.name, error = %msg, "pin index reconciliation failed");
                per_backend.insert(t.name.clone(), json!({"error": msg}));
                errors.push(format!("{}: {msg}", t.name));
            }
        }
    }
    let mut output = total.json();
    if let Value::Object(o) = &mut output {
        o.insert("backends".into(), Value::Object(per_backend));
    }
    TaskOutcome {
        output,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

async fn reconcile(
    ctx: &TaskCtx,
    t: &Target,
    chunk: usize,
    priority: i16,
) -> anyhow::Result<Option<Counts>> {
    let mut c = Counts::default();
    // One connection for the whole reconciliation: the temporary tables live in it. No
    // transaction is open while the backend is being listed.
    let mut conn = ctx.pool.acquire().await?;
    // The listing is copied as it comes into a table without an index, then sorted once
    // into the indexed one: inserting a million CIDs in the listing's (random) order into a
    // B-tree took about twice as long as the copy and the sort together.
    sqlx::raw_sql(
        "CREATE TEMP TABLE IF NOT EXISTS pinq_listed (cid text);
         CREATE TEMP TABLE IF NOT EXISTS pinq_scan (cid text PRIMARY KEY);
         CREATE TEMP TABLE IF NOT EXISTS pinq_busy (cid text PRIMARY KEY);
         TRUNCATE pinq_listed, pinq_scan, pinq_busy",
    )
    .execute(&mut *conn)
    .await?;
    let started: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *conn)
        .await?;

    let client = KuboClient::new(ctx.http.clone(), &t.url);
    let timeout = Duration::from_secs(ctx.settings.index_ls_timeout_secs.max(1));
    let mut stream = client.pin_ls_recursive(timeout).await?;
    let mut buf: Vec<String> = Vec::with_capacity(chunk);
    while let Some(item) = stream.next().await {
        // A listing cut short must not mark anything missing: fail the whole backend.
        let cid = item?;
        c.listed += 1;
        match canonical_of(&cid) {
            Some(k) => buf.push(k),
            None => c.unparsable += 1,
        }
        if buf.len() >= chunk {
            stage(&mut conn, STAGE_LISTED, &mut buf).await?;
            if ctx.shutdown.is_cancelled() {
                anyhow::bail!("interrupted by shutdown");
            }
        }
    }
    stage(&mut conn, STAGE_LISTED, &mut buf).await?;
    drop(stream);
    sqlx::raw_sql(
        "INSERT INTO pinq_scan (cid) SELECT DISTINCT cid FROM pinq_listed ORDER BY cid;
         TRUNCATE pinq_listed",
    )
    .execute(&mut *conn)
    .await?;

    // CIDs with a pending job on this backend: a job will settle them, so they are
    // neither missing nor repaired nor recorded as unmanaged now. Jobs keep the submitted
    // spelling; canonicalize.
    {
        let mut rows = sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT cid, replaces_cid FROM jobs
             WHERE backend_id = $1 AND state IN ('queued', 'running', 'retry_wait')",
        )
        .bind(t.id)
        .fetch(&ctx.pool);
        while let Some((cid, replaces)) = rows.try_next().await? {
            for s in std::iter::once(cid).chain(replaces) {
                if let Some(k) = canonical_of(&s) {
                    buf.push(k);
                }
            }
            if buf.len() >= chunk {
                stage(&mut conn, STAGE_BUSY, &mut buf).await?;
            }
        }
    }
    stage(&mut conn, STAGE_BUSY, &mut buf).await?;
    sqlx::raw_sql("ANALYZE pinq_scan, pinq_busy")
        .execute(&mut *conn)
        .await?;
    // The listed rows that are the index's (`missing` ones are about to be restored), counted
    // before the backend is locked: the figures are the run's report, not its work.
    let (verified, known_unmanaged): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE p.status IN ('pinned', 'missing')),
                count(*) FILTER (WHERE p.status = 'unmanaged')
         FROM pins p JOIN pinq_scan s ON s.cid = p.cid
         WHERE p.backend_id = $1",
    )
    .bind(t.id)
    .fetch_one(&mut *conn)
    .await?;

    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // The backend's row is locked first, as a backend's delete locks it before its pins:
    // reconciliations of one backend take turns (a second scheduler's waits here until
    // this one has committed), and a health probe's write waits for the transaction. The
    // lock does not stop jobs being submitted (they take a key-share lock).
    let (prev_mark,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT pins_listed_at FROM backends WHERE id = $1 FOR NO KEY UPDATE")
            .bind(t.id)
            .fetch_one(&mut *tx)
            .await?;
    // A run that waited behind one whose listing began later would apply an older picture
    // over a newer one (restore what that one found missing, and so on): it is dropped.
    if prev_mark.is_some_and(|m| m >= started) {
        tx.rollback().await?;
        sqlx::raw_sql("TRUNCATE pinq_scan, pinq_busy")
            .execute(&mut *conn)
            .await?;
        return Ok(None);
    }
    c.restored = sqlx::query(
        "UPDATE pins p SET status = 'pinned', verified_at = $2, updated_at = now(),
                           unlisted = false
         FROM pinq_scan s
         WHERE p.backend_id = $1 AND p.cid = s.cid AND p.status = 'missing'",
    )
    .bind(t.id)
    .bind(started)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Listed rows are not written: the backend's mark, set below, verifies them. Only
    // those the last listing did not show carry a flag to clear.
    sqlx::query(
        "UPDATE pins p SET unlisted = false
         FROM pinq_scan s
         WHERE p.backend_id = $1 AND p.cid = s.cid AND p.unlisted",
    )
    .bind(t.id)
    .execute(&mut *tx)
    .await?;
    c.verified = u64::try_from(verified).unwrap_or(0);
    // The backend's row is locked against its deletion, as a foreign key would; if it
    // is gone, nothing is inserted (see the `pins_without_key` migration).
    c.new_unmanaged = sqlx::query(
        "INSERT INTO pins (backend_id, cid, owner, status, pinned_at, verified_at)
         SELECT b.id, s.cid, NULL, 'unmanaged', now(), $2
         FROM (SELECT id FROM backends WHERE id = $1 FOR KEY SHARE) b, pinq_scan s
         WHERE NOT EXISTS (SELECT 1 FROM pins p WHERE p.backend_id = $1 AND p.cid = s.cid)
           AND NOT EXISTS (SELECT 1 FROM pinq_busy b WHERE b.cid = s.cid)
         ON CONFLICT (backend_id, cid) DO NOTHING",
    )
    .bind(t.id)
    .bind(started)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    c.unmanaged = u64::try_from(known_unmanaged).unwrap_or(0) + c.new_unmanaged;
    c.unmanaged_gone = sqlx::query(
        "DELETE FROM pins p
         WHERE p.backend_id = $1 AND p.status = 'unmanaged' AND p.updated_at < $2
           AND NOT EXISTS (SELECT 1 FROM pinq_scan s WHERE s.cid = p.cid)",
    )
    .bind(t.id)
    .bind(started)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // A pin gone from the node keeps, in its own `verified_at`, when it was last seen: the
    // previous listing, unless that one had not shown it either.
    c.newly_missing = sqlx::query(
        "UPDATE pins p SET status = 'missing', updated_at = now(),
                           verified_at = CASE WHEN p.unlisted THEN p.verified_at
                                              ELSE greatest(p.verified_at, $3) END
         WHERE p.backend_id = $1 AND p.status = 'pinned' AND p.updated_at < $2
           AND NOT EXISTS (SELECT 1 FROM pinq_scan s WHERE s.cid = p.cid)
           AND NOT EXISTS (SELECT 1 FROM pinq_busy b WHERE b.cid = p.cid)",
    )
    .bind(t.id)
    .bind(started)
    .bind(prev_mark)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Rows that stay `pinned` or `unmanaged` although this listing did not show them (a
    // pending job will settle them, or they changed while the backend was listed): the new
    // mark must not speak for them, so they are flagged, and their own `verified_at` keeps
    // when they were last seen.
    sqlx::query(
        "UPDATE pins p SET unlisted = true, verified_at = greatest(p.verified_at, $2)
         WHERE p.backend_id = $1 AND p.status IN ('pinned', 'unmanaged') AND NOT p.unlisted
           AND NOT EXISTS (SELECT 1 FROM pinq_scan s WHERE s.cid = p.cid)",
    )
    .bind(t.id)
    .bind(prev_mark)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE backends SET pins_listed_at = $2 WHERE id = $1")
        .bind(t.id)
        .bind(started)
        .execute(&mut *tx)
        .await?;
    let (missing,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM pins WHERE backend_id = $1 AND status = 'missing'")
            .bind(t.id)
            .fetch_one(&mut *tx)
            .await?;
    c.missing = u64::try_from(missing).unwrap_or(0);
    tx.commit().await?;

    c.repaired = repair(ctx, &mut conn, t, priority).await?;
    sqlx::raw_sql("TRUNCATE pinq_scan, pinq_busy")
        .execute(&mut *conn)
        .await?;
    Ok(Some(c))
}

/// Copies a chunk of the listing into its unindexed staging table.
const STAGE_LISTED: &str = "INSERT INTO pinq_listed (cid) SELECT unnest($1::text[])";
/// Copies a chunk of pending jobs' CIDs into `pinq_busy`.
const STAGE_BUSY: &str =
    "INSERT INTO pinq_busy (cid) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING";

/// Copies a chunk of canonical CIDs with `sql` (one of the `STAGE_` statements) and
/// empties the buffer.
async fn stage(
    conn: &mut PgConnection,
    sql: &'static str,
    buf: &mut Vec<String>,
) -> anyhow::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    sqlx::query(sql).bind(&*buf).execute(&mut *conn).await?;
    buf.clear();
    Ok(())
}

#[derive(Debug, FromRow)]
struct MissingPin {
    cid: String,
    owner: String,
    name: Option<String>,
    max_attempts: i32,
    backoff_base_ms: i32,
    backoff_factor: f64,
    backoff_max_ms: i32,
}

/// Creates repair pin jobs for missing pins without a pending job, a chunk per
/// transaction: one batch per owner and retry policy, their messages owed in the dispatch outbox for the relay.
async fn repair(
    ctx: &TaskCtx,
    conn: &mut PgConnection,
    t: &Target,
    priority: i16,
) -> anyhow::Result<u64> {
    let mut created = 0u64;
    let mut after = String::new();
    loop {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        // The retry policy of the job that pinned it, or the documented defaults.
        let rows: Vec<MissingPin> = sqlx::query_as(
            "SELECT p.cid, p.owner, p.name,
                    coalesce(j.max_attempts, 8) AS max_attempts,
                    coalesce(j.backoff_base_ms, 1000) AS backoff_base_ms,
                    coalesce(j.backoff_factor, 2.0) AS backoff_factor,
                    coalesce(j.backoff_max_ms, 300000) AS backoff_max_ms
             FROM pins p LEFT JOIN jobs j ON j.id = p.job_id
             WHERE p.backend_id = $1 AND p.status = 'missing' AND p.owner IS NOT NULL
               AND p.cid > $2
               AND NOT EXISTS (SELECT 1 FROM pinq_busy b WHERE b.cid = p.cid)
               AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.cid_key = p.cid AND r.backend_id = p.backend_id
                               AND r.state IN ('queued', 'running', 'retry_wait'))
             ORDER BY p.cid LIMIT $3
             FOR UPDATE OF p SKIP LOCKED",
        )
        .bind(t.id)
        .bind(&after)
        .bind(REPAIR_CHUNK)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            tx.rollback().await?;
            return Ok(created);
        };
        after = last.cid.clone();
        let full = rows.len() as i64 == REPAIR_CHUNK;
        let mut groups: BTreeMap<(String, i32, i32, u64, i32), Vec<MissingPin>> = BTreeMap::new();
        for r in rows {
            let key = (
                r.owner.clone(),
                r.max_attempts,
                r.backoff_base_ms,
                r.backoff_factor.to_bits(),
                r.backoff_max_ms,
            );
            groups.entry(key).or_default().push(r);
        }
        for ((owner, max_attempts, base_ms, factor_bits, max_ms), pins) in groups {
            let factor = f64::from_bits(factor_bits);
            let batch_id = Uuid::now_v7();
            let retry = json!({
                "max_attempts": max_attempts, "base_ms": base_ms, "factor": factor, "max_delay_ms": max_ms,
            });
            sqlx::query(
                "INSERT INTO batches (id, owner, priority, backends, retry, job_count)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(batch_id)
            .bind(&owner)
            .bind(priority)
            .bind(vec![t.name.clone()])
            .bind(sqlx::types::Json(&retry))
            .bind(pins.len() as i32)
            .execute(&mut *tx)
            .await?;
            db::lock_backends(&mut tx, &[t.id]).await?;
            let ids: Vec<Uuid> = pins.iter().map(|_| Uuid::now_v7()).collect();
            let seqs: Vec<i32> = (0..pins.len() as i32).collect();
            let cids: Vec<String> = pins.iter().map(|p| p.cid.clone()).collect();
            let names: Vec<Option<String>> = pins.iter().map(|p| p.name.clone()).collect();
            let meta =
                json!({"repair": {"reason": "missing on the backend", "schedule_run": ctx.run_id}});
            sqlx::query(
                // The pin index holds canonical CIDs: each is its own key.
                "INSERT INTO jobs (id, batch_id, seq, owner, backend_id, op, cid, name, meta,
                                   priority, max_attempts, backoff_base_ms, backoff_factor, backoff_max_ms,
                                   cid_key)
                 SELECT t.id, $1, t.seq, $2, $3, 'pin', t.cid, t.name, $4,
                        $5, $6, $7, $8, $9, t.cid
                 FROM UNNEST($10::uuid[], $11::int4[], $12::text[], $13::text[]) AS t(id, seq, cid, name)",
            )
            .bind(batch_id)
            .bind(&owner)
            .bind(t.id)
            .bind(sqlx::types::Json(&meta))
            .bind(priority)
            .bind(max_attempts)
            .bind(base_ms)
            .bind(factor)
            .bind(max_ms)
            .bind(&ids)
            .bind(&seqs)
            .bind(&cids)
            .bind(&names)
            .execute(&mut *tx)
            .await?;
            db::owe_dispatch(&mut tx, &ids, false).await?;
            created += pins.len() as u64;
            tracing::info!(backend = %t.name, owner = %owner, batch_id = %batch_id, jobs = pins.len(), "created repair jobs for missing pins");
        }
        tx.commit().await?;
        if !full {
            return Ok(created);
        }
    }
}
