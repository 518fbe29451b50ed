//! `pinq batch submit|status|ls|cancel|retry-failed`. Submission reads JSON (an ops array
//! or a whole batch object) or a plain list of CIDs, and `--follow` shows a progress bar
//! until the batch is done.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pinq_core::cid::PinCid;
use serde_json::{Map, Value, json};

use crate::UsageError;
use crate::client::Client;
use crate::output::{self, Table, print_json};

const SUBMIT_AFTER_HELP: &str = "\
Input (FILE, or - for standard input) is one of:
  a JSON array of operations    [{\"op\":\"pin\",\"cid\":\"bafy…\",\"name\":\"photo-1\"}, …]
  a JSON batch object           {\"ops\":[…], \"priority\":5, \"backends\":[\"local\"], \"retry\":{…}}
  plain CIDs, one per line      (blank lines and lines starting with # are skipped)
--op and --name-prefix apply to plain CID lists; --priority, --backend and
--max-attempts override what a JSON batch says.

Examples:
  pinq batch submit cids.txt --backend local --follow
  ipfs pin ls -q | pinq batch submit - --op unpin --priority 9
  pinq batch submit batch.json -o json | jq -r .id";

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BatchCommand {
    /// Submit a batch of pin/unpin operations.
    #[command(after_help = SUBMIT_AFTER_HELP)]
    Submit(SubmitArgs),
    /// Show a batch's progress: jobs per state.
    Status {
        /// Batch id.
        id: String,
        /// Keep showing progress until the batch is done.
        #[arg(long, short)]
        follow: bool,
    },
    /// List the newest batches.
    Ls {
        /// Most batches to show (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Cancel every job of a batch that has not finished.
    Cancel {
        /// Batch id.
        id: String,
    },
    /// Re-drive every failed job of a batch with a fresh attempt budget.
    RetryFailed {
        /// Batch id.
        id: String,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// File with the operations, or - for standard input.
    pub file: String,
    /// Operation for a plain list of CIDs.
    #[arg(long, value_enum, default_value_t = PlainOp::Pin)]
    pub op: PlainOp,
    /// Batch priority, 0 (lowest) to 9.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: Option<u8>,
    /// Backend to pin on; repeat for several [default: every enabled backend].
    #[arg(long = "backend", value_name = "NAME")]
    pub backends: Vec<String>,
    /// Name each op of a plain CID list PREFIX0, PREFIX1, …
    #[arg(long, value_name = "PREFIX")]
    pub name_prefix: Option<String>,
    /// Attempts per job before it fails (sets the batch's retry.max_attempts).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Idempotency key: submitting again with the same key returns the first batch.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Show a progress bar until the batch is done; exit 1 if any job failed.
    #[arg(long, short)]
    pub follow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlainOp {
    Pin,
    Unpin,
}

pub async fn run(client: &Client, cmd: BatchCommand) -> anyhow::Result<()> {
    match cmd {
        BatchCommand::Submit(args) => submit(client, args).await,
        BatchCommand::Status { id, follow } => {
            if follow {
                follow_batch(client, &id).await
            } else {
                let b = client.get(&format!("/v1/batches/{id}"), &[]).await?;
                if client.json() {
                    print_json(&b);
                } else {
                    print_batch(&b);
                }
                Ok(())
            }
        }
        BatchCommand::Ls { limit } => {
            let v = client
                .get("/v1/batches", &[("limit", limit.to_string())])
                .await?;
            if client.json() {
                print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(&["ID", "JOBS", "PRIORITY", "BACKENDS", "OWNER", "CREATED"]);
            for b in v["batches"].as_array().into_iter().flatten() {
                t.row(vec![
                    output::s(&b["id"]),
                    output::n(&b["job_count"]),
                    output::n(&b["priority"]),
                    join(&b["backends"]),
                    output::s(&b["owner"]),
                    output::ago(&b["created_at"]),
                ]);
            }
            if t.is_empty() {
                println!("no batches yet; submit one with `pinq batch submit FILE`");
            } else {
                t.print();
            }
            Ok(())
        }
        BatchCommand::Cancel { id } => {
            let v = client
                .post(&format!("/v1/batches/{id}/cancel"), None)
                .await?;
            if client.json() {
                print_json(&v);
            } else {
                println!(
                    "batch {id}: {} job(s) cancelled, {} running job(s) asked to stop",
                    output::n(&v["cancelled"]),
                    output::n(&v["stop_requested"])
                );
            }
            Ok(())
        }
        BatchCommand::RetryFailed { id } => {
            let v = client
                .post(&format!("/v1/batches/{id}/retry-failed"), None)
                .await?;
            if client.json() {
                print_json(&v);
            } else {
                println!(
                    "batch {id}: {} failed job(s) queued again",
                    output::n(&v["requeued"])
                );
            }
            Ok(())
        }
    }
}

fn join(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_else(|| "-".into())
}

/// Reads the input and builds the request body; bad input is a [`UsageError`].
pub fn build_body(text: &str, args: &SubmitArgs) -> Result<Value, UsageError> {
    let trimmed = text.trim_start();
    let mut obj: Map<String, Value> = if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            UsageError(format!(
                "{}: not valid JSON: {e} (line {}, column {})",
                source_name(&args.file),
                e.line(),
                e.column()
            ))
        })?;
        match v {
            Value::Array(ops) => {
                let mut m = Map::new();
                m.insert("ops".into(), Value::Array(ops));
                m
            }
            Value::Object(m) => m,
            _ => {
                return Err(UsageError(format!(
                    "{}: expected a JSON array of operations or a batch object",
                    source_name(&args.file)
                )));
            }
        }
    } else {
        let mut ops = Vec::new();
        let mut bad = Vec::new();
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Err(e) = PinCid::parse(line) {
                bad.push(format!(
                    "line {}: '{}' is not a CID ({e})",
                    lineno + 1,
                    output::clip(line, 60)
                ));
                continue;
            }
            let mut op = json!({
                "op": match args.op { PlainOp::Pin => "pin", PlainOp::Unpin => "unpin" },
                "cid": line,
            });
            if let Some(p) = &args.name_prefix {
                op["name"] = json!(format!("{p}{}", ops.len()));
            }
            ops.push(op);
        }
        if !bad.is_empty() {
            let more = if bad.len() > 3 {
                format!(" (and {} more)", bad.len() - 3)
            } else {
                String::new()
            };
            return Err(UsageError(format!(
                "{}: {}{more}",
                source_name(&args.file),
                bad[..bad.len().min(3)].join("; ")
            )));
        }
        if ops.is_empty() {
            return Err(UsageError(format!(
                "{}: no CIDs to submit (expected one CID per line, or JSON)",
                source_name(&args.file)
            )));
        }
        let mut m = Map::new();
        m.insert("ops".into(), Value::Array(ops));
        m
    };
    if let Some(p) = args.priority {
        obj.insert("priority".into(), json!(p));
    }
    if !args.backends.is_empty() {
        obj.insert("backends".into(), json!(args.backends));
    }
    if let Some(n) = args.max_attempts {
        let retry = obj.entry("retry").or_insert_with(|| json!({}));
        if let Value::Object(r) = retry {
            r.insert("max_attempts".into(), json!(n));
        } else {
            *retry = json!({ "max_attempts": n });
        }
    }
    Ok(Value::Object(obj))
}

fn source_name(file: &str) -> String {
    if file == "-" {
        "standard input".into()
    } else {
        file.to_owned()
    }
}

fn read_input(file: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("failed to read standard input")?;
    } else {
        text = std::fs::read_to_string(file)
            .map_err(|e| UsageError(format!("cannot read {file}: {e}")))?;
    }
    Ok(text)
}

async fn submit(client: &Client, args: SubmitArgs) -> anyhow::Result<()> {
    let text = read_input(&args.file)?;
    let body = build_body(&text, &args)?;
    let resp = match &args.idempotency_key {
        None => client.post("/v1/batches", Some(&body)).await?,
        Some(key) => {
            client
                .send_with_header(
                    reqwest::Method::POST,
                    "/v1/batches",
                    &body,
                    ("Idempotency-Key", key),
                )
                .await?
        }
    };
    let id = resp["id"]
        .as_str()
        .context("the API accepted the batch but returned no id")?
        .to_owned();
    if !args.follow {
        if client.json() {
            print_json(&resp);
        } else {
            println!(
                "batch {id} accepted: {} job(s)\nfollow it with: pinq batch status {id} --follow",
                output::n(&resp["jobs"])
            );
        }
        return Ok(());
    }
    if !client.json() {
        println!("batch {id} accepted: {} job(s)", output::n(&resp["jobs"]));
    }
    follow_batch(client, &id).await
}

/// Polls the batch until it is done, with a progress bar on a terminal; fails (exit 1) if
/// any job failed.
async fn follow_batch(client: &Client, id: &str) -> anyhow::Result<()> {
    let path = format!("/v1/batches/{id}");
    let first = client.get(&path, &[]).await?;
    let total = first["jobs"].as_u64().unwrap_or(0);
    let bar = if client.json() {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} {per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut b = first;
    loop {
        let c = &b["counts"];
        let get = |k: &str| c[k].as_u64().unwrap_or(0);
        bar.set_position(get("succeeded") + get("failed") + get("cancelled"));
        bar.set_message(format!(
            "✓ {} ✗ {} running {} waiting {}",
            get("succeeded"),
            get("failed"),
            get("running"),
            get("queued") + get("retry_wait")
        ));
        if b["state"] == "done" {
            break;
        }
        bar.tick();
        tokio::time::sleep(Duration::from_millis(500)).await;
        b = client.get(&path, &[]).await?;
    }
    bar.finish_and_clear();
    let c = &b["counts"];
    let failed = c["failed"].as_u64().unwrap_or(0);
    if client.json() {
        print_json(&b);
    } else {
        let secs = started.elapsed().as_secs_f64();
        println!(
            "batch {id} done in {:.1}s: {} succeeded, {} failed, {} cancelled",
            secs,
            output::n(&c["succeeded"]),
            failed,
            output::n(&c["cancelled"])
        );
    }
    if failed > 0 {
        anyhow::bail!(
            "batch {id} finished with {failed} failed job(s); see why with `pinq jobs ls --batch {id} --state failed` and `pinq jobs show JOB`, re-drive with `pinq batch retry-failed {id}`"
        );
    }
    Ok(())
}

fn print_batch(b: &Value) {
    let c = &b["counts"];
    println!("batch      {}", output::s(&b["id"]));
    println!("state      {}", output::s(&b["state"]));
    println!("jobs       {}", output::n(&b["jobs"]));
    println!("priority   {}", output::n(&b["priority"]));
    println!("backends   {}", join(&b["backends"]));
    println!("created    {}", output::ago(&b["created_at"]));
    let mut t = Table::new(&[
        "QUEUED",
        "RUNNING",
        "RETRY_WAIT",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
    ]);
    t.row(
        [
            "queued",
            "running",
            "retry_wait",
            "succeeded",
            "failed",
            "cancelled",
        ]
        .iter()
        .map(|k| output::n(&c[*k]))
        .collect(),
    );
    println!();
    t.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(file: &str) -> SubmitArgs {
        SubmitArgs {
            file: file.into(),
            op: PlainOp::Unpin,
            priority: Some(7),
            backends: vec!["local".into()],
            name_prefix: Some("n-".into()),
            max_attempts: Some(1),
            idempotency_key: None,
            follow: false,
        }
    }

    const V0: &str = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";

    #[test]
    fn plain_lists_become_ops_with_names_and_flags() {
        let body = build_body(&format!("# comment\n\n{V0}\n {V0} \n"), &args("x")).expect("valid");
        assert_eq!(body["ops"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            body["ops"][1],
            json!({"op": "unpin", "cid": V0, "name": "n-1"})
        );
        assert_eq!(body["priority"], 7);
        assert_eq!(body["backends"], json!(["local"]));
        assert_eq!(body["retry"], json!({"max_attempts": 1}));
    }

    #[test]
    fn json_arrays_and_objects_are_accepted() {
        let a = build_body(&format!(r#"[{{"op":"pin","cid":"{V0}"}}]"#), &args("x")).expect("ok");
        assert_eq!(a["ops"][0]["op"], "pin");
        let o = build_body(
            r#"{"ops":[],"retry":{"max_attempts":3,"base_ms":10}}"#,
            &args("x"),
        )
        .expect("ok");
        assert_eq!(o["retry"], json!({"max_attempts": 1, "base_ms": 10}));
    }

    #[test]
    fn bad_cids_are_reported_by_line() {
        let e = build_body(&format!("{V0}\nnot-a-cid\n"), &args("-")).expect_err("invalid");
        assert!(
            e.0.starts_with("standard input: line 2: 'not-a-cid' is not a CID"),
            "{e}"
        );
    }
}
