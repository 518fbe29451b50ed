//! By-hand benchmark of the scheduler's `index-update` (not run in CI):
//!
//!     cargo build --workspace --bins && cargo run -p pinq-e2e --example reconcile_bench -- 10000 100000
//!
//! For each pin count N it creates a fresh database whose pin index holds N pins on one
//! backend, starts the real `pinq-scheduler` binary, asks for one `index-update` run, and
//! prints the run's time and the scheduler's peak resident memory (VmHWM).
//!
//! The backend is a TEST DOUBLE of Kubo's `pin/ls?type=recursive&stream=true`: a small
//! HTTP server in this process that streams N synthetic CIDs as NDJSON. js-ipfs cannot
//! be made to hold 100,000 pins in reasonable time on a 2-core machine. 1% of the index's
//! pins are absent from the double's listing (→ missing + repair jobs) and the listing has
//! 1% CIDs the index does not know (→ unmanaged). Needs PostgreSQL (PINQ_TEST_PG); no
//! broker is needed (the relay is pointed at a closed port and just retries).

use std::process::Command;
use std::time::{Duration, Instant};

use cid::Cid;
use cid::multihash::Multihash;
use pinq_e2e::{Proc, TestDb, bin_path, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The i-th synthetic CID (CIDv1 raw, a fake sha2-256 digest), in canonical base32.
fn synthetic_cid(i: u64) -> String {
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&i.to_be_bytes());
    digest[8..16].copy_from_slice(&(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_be_bytes());
    let mh = Multihash::<64>::wrap(0x12, &digest).expect("32-byte digest fits");
    Cid::new_v1(0x55, mh).to_string()
}

/// TEST DOUBLE: serves `pin/ls` for CIDs `from..to`, streamed as NDJSON.
async fn start_pin_ls_double(from: u64, to: u64) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req);
                if !head.contains("/api/v0/pin/ls") {
                    let _ = sock
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"Message\":\"test double serves pin/ls only\",\"Code\":0}")
                        .await;
                    return;
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n")
                    .await;
                let mut out = Vec::with_capacity(1 << 16);
                for i in from..to {
                    out.extend_from_slice(
                        format!(
                            "{{\"Cid\":\"{}\",\"Type\":\"recursive\"}}\n",
                            synthetic_cid(i)
                        )
                        .as_bytes(),
                    );
                    if out.len() > 60_000 {
                        if sock.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
                let _ = sock.write_all(&out).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(url)
}

fn proc_status_kib(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn bench(n: u64) -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let skew = n / 100;
    let url = start_pin_ls_double(skew, n + skew).await?;
    let (backend_id,): (uuid::Uuid,) = sqlx::query_as(
        "INSERT INTO backends (id, name, kind, url) VALUES (gen_random_uuid(), 'bench', 'kubo', $1) RETURNING id",
    )
    .bind(&url)
    .fetch_one(&db.pool)
    .await?;
    // The index: CIDs 0..n, pinned by owner 'bench' (ten minutes ago, so none is "fresh").
    let mut i = 0;
    while i < n {
        let end = (i + 10_000).min(n);
        let cids: Vec<String> = (i..end).map(synthetic_cid).collect();
        sqlx::query(
            "INSERT INTO pins (backend_id, cid, owner, status, pinned_at, updated_at)
             SELECT $1, c, 'bench', 'pinned', now() - interval '10 minutes', now() - interval '10 minutes'
             FROM unnest($2::text[]) AS c",
        )
        .bind(backend_id)
        .bind(&cids)
        .execute(&db.pool)
        .await?;
        i = end;
    }
    sqlx::query("UPDATE schedules SET enabled = false")
        .execute(&db.pool)
        .await?;

    let dir = std::env::temp_dir().join(format!("pinq-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(bin_path("pinq-scheduler"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env(
            "AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
        )
        .env("PINQ_CRON_TICK_MS", "100")
        .env("RUST_LOG", "warn");
    let mut sched = Proc::spawn("scheduler", cmd, &dir)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = proc_status_kib(sched.pid(), "VmRSS:");

    let (run_id,): (i64,) = sqlx::query_as(
        "INSERT INTO schedule_runs (schedule, fire_time, manual, status)
         VALUES ('index-update', clock_timestamp(), true, 'pending') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await?;
    let wall = Instant::now();
    let (status, ms, output): (String, f64, sqlx::types::Json<serde_json::Value>) = loop {
        let row: (String, Option<f64>, sqlx::types::Json<serde_json::Value>) = sqlx::query_as(
            "SELECT status, extract(epoch FROM finished_at - started_at)::float8 * 1000, output
             FROM schedule_runs WHERE id = $1",
        )
        .bind(run_id)
        .fetch_one(&db.pool)
        .await?;
        if let (s, Some(ms), out) = row
            && s != "running"
            && s != "pending"
        {
            break (s, ms, out);
        }
        anyhow::ensure!(
            wall.elapsed() < Duration::from_secs(600),
            "run did not finish in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let peak = proc_status_kib(sched.pid(), "VmHWM:");
    let _ = sched.terminate(Duration::from_secs(10)).await;
    let o = &output.0;
    println!(
        "pins={n:>7}  status={status}  run_time={:.2}s  scheduler_rss_idle={:.1}MiB  scheduler_peak_rss(VmHWM)={:.1}MiB  listed={} verified={} missing={} repaired={} unmanaged={}  [backend: TEST DOUBLE of Kubo pin/ls]",
        ms / 1000.0,
        idle_rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        o["listed"],
        o["verified"],
        o["missing"],
        o["repaired"],
        o["unmanaged"],
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let counts: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![10_000, 100_000]
    } else {
        counts
    };
    for n in counts {
        bench(n).await?;
    }
    Ok(())
}
