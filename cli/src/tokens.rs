//! `pinq tokens`: create, list and revoke API tokens, straight in the database (so the
//! first user token can be made before any API is reachable). A created token is printed
//! once; only its SHA-256 is stored.

use anyhow::Context;
use pinq_core::config::ServiceArgs;
use pinq_core::tokens::{self, CreateTokenError, Scope, TokenRow};
use serde_json::json;

use crate::UsageError;
use crate::output::{Table, print_json};

#[derive(Debug, clap::Args)]
pub struct TokensArgs {
    #[command(subcommand)]
    pub command: TokensCommand,
    #[command(flatten)]
    pub services: ServiceArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Create a token and print it (once: only its hash is stored).
    Create {
        /// A name for the token, unique among live tokens.
        #[arg(long)]
        name: String,
        /// The tenant the token acts for (default: the name).
        #[arg(long)]
        owner: Option<String>,
        /// Admin scope: every tenant's data, backends, schedules, workers and tokens.
        #[arg(long)]
        admin: bool,
        /// `text` prints the token alone on its last line; `json` prints an object.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// List tokens (never their secrets).
    Ls {
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Revoke a live token by id or name; it stops working at once.
    Revoke {
        /// Token id or name.
        token: String,
    },
}

pub async fn run(args: TokensArgs) -> anyhow::Result<()> {
    let pool = pinq_core::db::connect(&args.services.database_url, 2)
        .await
        .context("failed to connect to PostgreSQL (DATABASE_URL)")?;
    match args.command {
        TokensCommand::Create {
            name,
            owner,
            admin,
            output,
        } => {
            let scope = if admin { Scope::Admin } else { Scope::User };
            let owner = owner.unwrap_or_else(|| name.clone());
            let (row, secret) = tokens::create_token(&pool, &name, &owner, scope)
                .await
                .map_err(|e| match e {
                    CreateTokenError::Db(e) => {
                        anyhow::Error::new(e).context("failed to store the token")
                    }
                    other => anyhow::Error::new(UsageError(other.to_string())),
                })?;
            if output == "json" {
                let mut v = view(&row);
                v["token"] = json!(secret);
                print_json(&v);
            } else {
                eprintln!(
                    "created {} token '{}' (id {}) for owner '{}'; it is shown only now:",
                    row.scope, row.name, row.id, row.owner
                );
                println!("{secret}");
            }
        }
        TokensCommand::Ls { all, output } => {
            let rows = tokens::list_tokens(&pool, all).await?;
            if output == "json" {
                print_json(&json!(rows.iter().map(view).collect::<Vec<_>>()));
            } else {
                let mut t = Table::new(&[
                    "ID",
                    "NAME",
                    "OWNER",
                    "SCOPE",
                    "PREFIX",
                    "CREATED",
                    "LAST USED",
                    "REVOKED",
                ]);
                for r in &rows {
                    let at = |t: Option<chrono::DateTime<chrono::Utc>>| {
                        t.map_or_else(
                            || "-".to_owned(),
                            |t| t.format("%Y-%m-%d %H:%M").to_string(),
                        )
                    };
                    t.row(vec![
                        r.id.to_string(),
                        r.name.clone(),
                        r.owner.clone(),
                        r.scope.clone(),
                        format!("{}…", r.prefix),
                        at(Some(r.created_at)),
                        at(r.last_used_at),
                        at(r.revoked_at),
                    ]);
                }
                t.print();
            }
        }
        TokensCommand::Revoke { token } => match tokens::revoke_token(&pool, &token).await? {
            Some(r) => println!("revoked token '{}' ({})", r.name, r.id),
            None => {
                return Err(UsageError(format!("no live token with id or name '{token}'")).into());
            }
        },
    }
    pool.close().await;
    Ok(())
}

fn view(r: &TokenRow) -> serde_json::Value {
    json!({
        "id": r.id, "name": r.name, "owner": r.owner, "scope": r.scope, "prefix": r.prefix,
        "created_at": r.created_at, "last_used_at": r.last_used_at, "revoked_at": r.revoked_at,
    })
}
