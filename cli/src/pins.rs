//! `pinq pins ls`: the pin index, what pinq believes each backend holds.

use crate::client::Client;
use crate::output::{self, Table, print_json};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PinsCommand {
    /// List pin index rows, by backend then CID.
    Ls {
        /// Only this backend.
        #[arg(long, value_name = "NAME")]
        backend: Option<String>,
        /// Only this CID (any spelling of it).
        #[arg(long)]
        cid: Option<String>,
        /// Only rows with this status.
        #[arg(long, value_parser = ["pinned", "missing", "unmanaged"])]
        status: Option<String>,
        /// Most rows to show (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

pub async fn run(client: &Client, cmd: PinsCommand) -> anyhow::Result<()> {
    let PinsCommand::Ls {
        backend,
        cid,
        status,
        limit,
    } = cmd;
    let mut q = vec![("limit", limit.to_string())];
    if let Some(b) = backend {
        q.push(("backend", b));
    }
    if let Some(c) = cid {
        q.push(("cid", c));
    }
    if let Some(s) = status {
        q.push(("status", s));
    }
    let v = client.get("/v1/pin-index", &q).await?;
    if client.json() {
        print_json(&v);
        return Ok(());
    }
    let mut t = Table::new(&[
        "BACKEND", "CID", "STATUS", "OWNERS", "NAME", "PINNED", "VERIFIED",
    ]);
    for p in v["pins"].as_array().into_iter().flatten() {
        t.row(vec![
            output::s(&p["backend"]),
            output::s(&p["cid"]),
            output::s(&p["status"]),
            owners(&p["owners"]),
            output::s(&p["name"]),
            output::ago(&p["pinned_at"]),
            output::ago(&p["verified_at"]),
        ]);
    }
    if t.is_empty() {
        println!("no pins match");
    } else {
        t.print();
        if !v["next"].is_null() {
            println!("(more pins exist; raise --limit or narrow the filter)");
        }
    }
    Ok(())
}

/// The owners holding a reference to a pin, comma-separated ("-" for none).
fn owners(v: &serde_json::Value) -> String {
    let names: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str())
        .collect();
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(",")
    }
}
