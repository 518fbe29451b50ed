//! `pinq backends ls|add|rm|check`, `pinq workers ls`, `pinq schedules
//! ls|run|enable|disable`: the admin resources.

use serde_json::{Value, json};

use crate::client::Client;
use crate::output::{self, Table, print_json};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BackendsCommand {
    /// List backends with their health.
    Ls,
    /// Register a backend.
    #[command(after_help = "Example:\n  pinq backends add local http://127.0.0.1:5001")]
    Add {
        /// Name jobs refer to it by (letters, digits, . _ -).
        name: String,
        /// URL of the node's RPC API, e.g. http://127.0.0.1:5001.
        url: String,
        /// Backend kind.
        #[arg(long, default_value = "kubo", value_parser = ["kubo"])]
        kind: String,
    },
    /// Remove a backend (refused while it has unfinished jobs, and while it has finished
    /// ones unless --purge; its pin index rows go with it).
    Rm {
        /// Backend name.
        name: String,
        /// Also delete the backend's finished jobs (their history).
        #[arg(long)]
        purge: bool,
    },
    /// Probe a backend now and record the result.
    Check {
        /// Backend name.
        name: String,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum WorkersCommand {
    /// List workers: live ones, and those that stopped in the last hour.
    Ls,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SchedulesCommand {
    /// List schedules with their next fire time and last outcome.
    Ls,
    /// Run a schedule now (a scheduler picks it up within a second or so).
    Run {
        /// Schedule name.
        name: String,
    },
    /// Enable a schedule.
    Enable {
        /// Schedule name.
        name: String,
    },
    /// Disable a schedule.
    Disable {
        /// Schedule name.
        name: String,
    },
}

pub async fn backends(client: &Client, cmd: BackendsCommand) -> anyhow::Result<()> {
    match cmd {
        BackendsCommand::Ls => {
            let v = client.get("/v1/backends", &[]).await?;
            if client.json() {
                print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(&[
                "NAME",
                "KIND",
                "URL",
                "ENABLED",
                "HEALTH",
                "SINCE",
                "LAST PROBE",
                "LATENCY",
                "ERROR",
            ]);
            for b in v["backends"].as_array().into_iter().flatten() {
                let h = &b["health"];
                let p = &h["latest_probe"];
                t.row(vec![
                    output::s(&b["name"]),
                    output::s(&b["kind"]),
                    output::s(&b["url"]),
                    output::s(&b["enabled"]),
                    if h.is_null() {
                        output::s(&b["status"])
                    } else {
                        output::s(&h["status"])
                    },
                    output::ago(&h["status_since"]),
                    output::ago(&p["probed_at"]),
                    output::ms_field(&p["latency_ms"]),
                    output::clip(&output::s(&p["error"]), 50),
                ]);
            }
            if t.is_empty() {
                println!("no backends; add one with `pinq backends add NAME URL`");
            } else {
                t.print();
            }
            Ok(())
        }
        BackendsCommand::Add { name, url, kind } => {
            let v = client
                .post(
                    "/v1/backends",
                    Some(&json!({"name": name, "kind": kind, "url": url})),
                )
                .await?;
            if client.json() {
                print_json(&v);
            } else {
                println!(
                    "backend {} added ({})",
                    output::s(&v["name"]),
                    output::s(&v["url"])
                );
            }
            Ok(())
        }
        BackendsCommand::Rm { name, purge } => {
            let path = if purge {
                format!("/v1/backends/{name}?purge=true")
            } else {
                format!("/v1/backends/{name}")
            };
            let v = client.delete(&path).await?;
            if client.json() {
                print_json(&v);
            } else {
                println!(
                    "backend {name} removed (with {} finished job(s))",
                    output::n(&v["jobs_removed"])
                );
            }
            Ok(())
        }
        BackendsCommand::Check { name } => {
            let v = client
                .post(&format!("/v1/backends/{name}/check"), None)
                .await?;
            if client.json() {
                print_json(&v);
            } else if v["ok"] == true {
                println!(
                    "backend {name}: ok in {} (node {}, {} objects), status {}",
                    output::ms_field(&v["latency_ms"]),
                    output::s(&v["node_version"]),
                    output::n(&v["num_objects"]),
                    output::s(&v["status"])
                );
            } else {
                println!(
                    "backend {name}: probe failed after {}: {}; status {}",
                    output::ms_field(&v["latency_ms"]),
                    output::s(&v["error"]),
                    output::s(&v["status"])
                );
            }
            if v["ok"] == true {
                Ok(())
            } else {
                anyhow::bail!("backend {name} did not answer its health probe")
            }
        }
    }
}

pub async fn workers(client: &Client, cmd: WorkersCommand) -> anyhow::Result<()> {
    let WorkersCommand::Ls = cmd;
    let v = client.get("/v1/workers", &[]).await?;
    if client.json() {
        print_json(&v);
        return Ok(());
    }
    let t = workers_table(&v["workers"]);
    if t.is_empty() {
        println!("no workers have reported in the last hour");
    } else {
        t.print();
    }
    Ok(())
}

pub fn workers_table(workers: &Value) -> Table {
    let mut t = Table::new(&[
        "ID",
        "HOST",
        "PID",
        "STATE",
        "IN FLIGHT",
        "RUNNING",
        "STARTED",
        "HEARTBEAT",
    ]);
    for w in workers.as_array().into_iter().flatten() {
        t.row(vec![
            output::s(&w["id"]),
            output::s(&w["host"]),
            output::n(&w["pid"]),
            output::s(&w["state"]),
            format!(
                "{}/{}",
                output::n(&w["in_flight"]),
                output::n(&w["concurrency"])
            ),
            output::n(&w["running_jobs"]),
            output::ago(&w["started_at"]),
            output::ago(&w["last_heartbeat"]),
        ]);
    }
    t
}

pub async fn schedules(client: &Client, cmd: SchedulesCommand) -> anyhow::Result<()> {
    match cmd {
        SchedulesCommand::Ls => {
            let v = client.get("/v1/schedules", &[]).await?;
            if client.json() {
                print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(&[
                "NAME",
                "TASK",
                "CRON",
                "ENABLED",
                "NEXT",
                "LAST FIRE",
                "LAST OUTCOME",
            ]);
            for s in v["schedules"].as_array().into_iter().flatten() {
                t.row(vec![
                    output::s(&s["name"]),
                    output::s(&s["task"]),
                    output::s(&s["cron"]),
                    output::s(&s["enabled"]),
                    output::ago(&s["next_fire_at"]),
                    output::ago(&s["last_fire_at"]),
                    output::s(&s["last_outcome"]),
                ]);
            }
            t.print();
            Ok(())
        }
        SchedulesCommand::Run { name } => {
            let v = client
                .post(&format!("/v1/schedules/{name}/run"), None)
                .await?;
            if client.json() {
                print_json(&v);
            } else {
                println!(
                    "schedule {name}: run requested ({}); see `pinq schedules ls`",
                    output::s(&v["status"])
                );
            }
            Ok(())
        }
        SchedulesCommand::Enable { name } => set_enabled(client, &name, true).await,
        SchedulesCommand::Disable { name } => set_enabled(client, &name, false).await,
    }
}

async fn set_enabled(client: &Client, name: &str, enabled: bool) -> anyhow::Result<()> {
    let v = client
        .patch(
            &format!("/v1/schedules/{name}"),
            &json!({ "enabled": enabled }),
        )
        .await?;
    if client.json() {
        print_json(&v);
    } else {
        println!(
            "schedule {name} {}",
            if enabled { "enabled" } else { "disabled" }
        );
    }
    Ok(())
}
