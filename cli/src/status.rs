//! `pinq status`: is the API up and ready, what do the workers (from their heartbeats),
//! the queue and the backends look like, and how many jobs are in each state.

use serde_json::{Value, json};

use crate::client::Client;
use crate::output::{self, Table, print_json};
use crate::resources::workers_table;

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {}

pub async fn run(client: &Client, _args: StatusArgs) -> anyhow::Result<()> {
    let (ready_code, ready) = client.probe("/readyz").await?;
    let stats = client.get("/v1/stats", &[]).await?;
    if client.json() {
        print_json(&json!({
            "api": {"url": client.base_url(), "ready": ready_code == 200, "checks": ready["checks"]},
            "stats": stats,
        }));
        return Ok(());
    }
    print_status(client.base_url(), ready_code == 200, &ready, &stats);
    Ok(())
}

pub fn print_status(url: &str, ready: bool, readyz: &Value, stats: &Value) {
    let checks = &readyz["checks"];
    println!(
        "API        {url}  {}  (postgres {}, rabbitmq {})",
        if ready { "ready" } else { "NOT READY" },
        output::s(&checks["postgres"]),
        output::s(&checks["rabbitmq"])
    );
    let q = &stats["queue"];
    println!(
        "queue      {}  {}",
        output::s(&q["name"]),
        if q["depth"].is_null() {
            "unknown depth (broker unreachable)".into()
        } else {
            format!(
                "{} message(s) waiting, {} of them on {}",
                output::n(&q["depth"]),
                output::n(&q["urgent"]["depth"]),
                output::s(&q["urgent"]["name"])
            )
        }
    );
    let j = &stats["jobs"];
    println!(
        "jobs       queued {}  running {}  retry_wait {}  succeeded {}  failed {}  cancelled {}",
        output::n(&j["queued"]),
        output::n(&j["running"]),
        output::n(&j["retry_wait"]),
        output::n(&j["succeeded"]),
        output::n(&j["failed"]),
        output::n(&j["cancelled"])
    );
    let r = &stats["recent"];
    println!(
        "last 60s   {} succeeded, {} failed; submit→done p50 {} p90 {} p99 {} max {}",
        output::n(&r["succeeded_60s"]),
        output::n(&r["failed_60s"]),
        output::ms_field(&r["latency_p50_ms"]),
        output::ms_field(&r["latency_p90_ms"]),
        output::ms_field(&r["latency_p99_ms"]),
        output::ms_field(&r["latency_max_ms"])
    );
    let w = &stats["workers"];
    if !w.is_null() {
        println!(
            "workers    {} live, {} of {} slots busy",
            output::n(&w["live"]),
            output::n(&w["in_flight"]),
            output::n(&w["concurrency"])
        );
        let t = workers_table(&w["workers"]);
        if !t.is_empty() {
            println!();
            t.print();
        }
    }
    if let Some(bs) = stats["backends"].as_array() {
        println!();
        let mut t = Table::new(&[
            "BACKEND",
            "HEALTH",
            "SINCE",
            "LAST PROBE",
            "LATENCY",
            "ERROR",
        ]);
        for b in bs {
            t.row(vec![
                output::s(&b["name"]),
                output::s(&b["status"]),
                output::ago(&b["status_since"]),
                output::ago(&b["last_probe_at"]),
                output::ms_field(&b["last_probe_latency_ms"]),
                output::clip(&output::s(&b["last_probe_error"]), 50),
            ]);
        }
        if t.is_empty() {
            println!("no backends; add one with `pinq backends add NAME URL`");
        } else {
            t.print();
        }
    }
}
