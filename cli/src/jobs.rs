//! `pinq jobs ls|show|retry|cancel`. `show` prints every attempt with its worker, timing
//! and error: the answer to "why did this pin fail?".

use std::collections::HashMap;

use serde_json::Value;

use crate::client::Client;
use crate::output::{self, Table, print_json};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    Ls {
        /// Only jobs in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Only jobs of this batch.
        #[arg(long, value_name = "ID")]
        batch: Option<String>,
        /// Only jobs for this CID (any spelling of it).
        #[arg(long)]
        cid: Option<String>,
        /// Most jobs to show (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one job with every attempt: worker, timing, outcome and error.
    Show {
        /// Job id.
        id: String,
    },
    /// Re-drive a failed job with a fresh attempt budget.
    Retry {
        /// Job id.
        id: String,
    },
    /// Cancel a job that has not finished (a running one is asked to stop).
    Cancel {
        /// Job id.
        id: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum State {
    Queued,
    Running,
    RetryWait,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::RetryWait => "retry_wait",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

pub async fn run(client: &Client, cmd: JobsCommand) -> anyhow::Result<()> {
    match cmd {
        JobsCommand::Ls {
            state,
            batch,
            cid,
            limit,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(s) = state {
                q.push(("state", s.as_str().to_owned()));
            }
            if let Some(b) = batch {
                q.push(("batch", b));
            }
            if let Some(c) = cid {
                q.push(("cid", c));
            }
            let v = client.get("/v1/jobs", &q).await?;
            if client.json() {
                print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(&[
                "ID", "BATCH", "OP", "CID", "BACKEND", "STATE", "ATTEMPT", "AGE", "ERROR",
            ]);
            for j in v["jobs"].as_array().into_iter().flatten() {
                t.row(vec![
                    output::s(&j["id"]),
                    output::clip(&output::s(&j["batch_id"]), 8),
                    output::s(&j["op"]),
                    output::clip(&output::s(&j["cid"]), 24),
                    output::s(&j["backend"]),
                    output::s(&j["state"]),
                    format!(
                        "{}/{}",
                        output::n(&j["attempt"]),
                        output::n(&j["max_attempts"])
                    ),
                    output::ago(&j["created_at"]),
                    output::clip(&output::s(&j["last_error"]), 60),
                ]);
            }
            if t.is_empty() {
                println!("no jobs match");
            } else {
                t.print();
                if !v["next"].is_null() {
                    println!("(more jobs exist; raise --limit or narrow the filter)");
                }
            }
            Ok(())
        }
        JobsCommand::Show { id } => {
            let mut j = client.get(&format!("/v1/jobs/{id}"), &[]).await?;
            // Name each attempt's worker by host and pid when the fleet is visible (admin
            // tokens); a tenant token sees worker ids only.
            let workers: HashMap<String, String> = match client.get("/v1/workers", &[]).await {
                Ok(w) => w["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|w| {
                        (
                            output::s(&w["id"]),
                            format!("{} pid {}", output::s(&w["host"]), output::n(&w["pid"])),
                        )
                    })
                    .collect(),
                Err(_) => HashMap::new(),
            };
            if let Some(attempts) = j["attempts"].as_array_mut() {
                for a in attempts.iter_mut() {
                    if let Some(w) = workers.get(&output::s(&a["worker_id"])) {
                        a["worker"] = Value::String(w.clone());
                    }
                }
            }
            if client.json() {
                print_json(&j);
            } else {
                print_job(&j);
            }
            Ok(())
        }
        JobsCommand::Retry { id } => {
            let v = client.post(&format!("/v1/jobs/{id}/retry"), None).await?;
            if client.json() {
                print_json(&v);
            } else {
                println!("job {id} queued again");
            }
            Ok(())
        }
        JobsCommand::Cancel { id } => {
            let v = client.post(&format!("/v1/jobs/{id}/cancel"), None).await?;
            if client.json() {
                print_json(&v);
            } else {
                println!("job {id}: {}", output::s(&v["result"]));
            }
            Ok(())
        }
    }
}

fn print_job(j: &Value) {
    let field = |k: &str, v: String| println!("{k:<12} {v}");
    field("job", output::s(&j["id"]));
    field("batch", output::s(&j["batch_id"]));
    field("op", output::s(&j["op"]));
    field("cid", output::s(&j["cid"]));
    if !j["replaces_cid"].is_null() {
        field("replaces", output::s(&j["replaces_cid"]));
    }
    if !j["name"].is_null() {
        field("name", output::s(&j["name"]));
    }
    field("backend", output::s(&j["backend"]));
    field("state", output::s(&j["state"]));
    field(
        "attempts",
        format!(
            "{} of {}",
            output::n(&j["attempt"]),
            output::n(&j["max_attempts"])
        ),
    );
    field("priority", output::n(&j["priority"]));
    field("created", output::ago(&j["created_at"]));
    if !j["waiting_for"].is_null() {
        field(
            "waiting for",
            format!(
                "job {} (an earlier operation on this CID and backend)",
                output::s(&j["waiting_for"])
            ),
        );
    } else if j["state"] == "retry_wait" {
        field("next try", output::ago(&j["run_at"]));
    }
    if !j["finished_at"].is_null() {
        field(
            "finished",
            format!(
                "{} (submit→done {})",
                output::ago(&j["finished_at"]),
                output::between(&j["created_at"], &j["finished_at"])
            ),
        );
    }
    if !j["last_error"].is_null() {
        field("last error", output::s(&j["last_error"]));
    }
    let attempts = j["attempts"].as_array().cloned().unwrap_or_default();
    println!();
    if attempts.is_empty() {
        println!("no attempts yet");
        return;
    }
    let mut t = Table::new(&["#", "WORKER", "STARTED", "DURATION", "OUTCOME", "ERROR"]);
    for a in &attempts {
        let worker = if a["worker"].is_string() {
            output::s(&a["worker"])
        } else {
            output::s(&a["worker_id"])
        };
        t.row(vec![
            output::n(&a["attempt"]),
            worker,
            output::ago(&a["started_at"]),
            output::between(&a["started_at"], &a["finished_at"]),
            if a["outcome"].is_null() {
                "running".into()
            } else {
                output::s(&a["outcome"])
            },
            output::s(&a["error"]),
        ]);
    }
    t.print();
}
