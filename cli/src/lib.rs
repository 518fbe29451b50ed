//! pinq-cli: the `pinq` command. Owns the command-line surface (clap definitions),
//! dispatch to the subcommands, and the mapping of errors to one stderr line and an exit
//! code.
//!
//! Subcommands live in their own modules: [`migrate`] prepares the database, [`up`]
//! launches and supervises the API, the workers and the scheduler on one machine, and
//! [`commands`] wires the API clients (`status`, `batch`, `jobs`, `pins`, `backends`,
//! `workers`, `schedules`, `bench`, `monitor`) and `completions`.

pub mod batch;
pub mod bench;
pub mod client;
pub mod commands;
pub mod completions;
pub mod jobs;
pub mod migrate;
pub mod monitor;
pub mod output;
pub mod pins;
pub mod resources;
pub mod status;
pub mod tokens;
pub mod up;

use std::process::ExitCode;

use pinq_core::config::{LogArgs, ServiceArgs};

const AFTER_HELP: &str = "\
Start here: `pinq up --help`, then `pinq status`.

Commands other than up, migrate and tokens talk to the API: set --api-url / PINQ_API_URL
(default http://127.0.0.1:8080) and --token / PINQ_TOKEN (default $PINQ_ADMIN_TOKEN).
Read commands print tables; add --output json for scripts.

Exit codes:
  0  success
  1  failure: a batch or bench had failed jobs, the API answered 404/409/5xx, or
     another runtime error
  2  usage or bad input: a wrong flag, an unreadable or invalid input file, or a
     request the API rejected (400, 413, 415)
  3  the API is unreachable (connection refused, timeout, 503)
  4  the API refused the token (401, 403), or no token is set";

/// The `pinq` command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "pinq",
    version,
    about = "pinq: IPFS pinning jobs on PostgreSQL and RabbitMQ",
    long_about = "pinq: IPFS pinning jobs on PostgreSQL and RabbitMQ.\n\n\
        `pinq migrate` prepares the database; `pinq up` runs the whole system (API, \
        workers, scheduler) on this machine. Every flag can also be set through the \
        environment variable shown in its help.",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create the database if it is missing and apply pending migrations.
    Migrate(MigrateArgs),
    /// Run the API, workers and scheduler here, restarting any that crash.
    Up(up::UpArgs),
    /// Create, list and revoke API tokens (directly in the database).
    Tokens(tokens::TokensArgs),
    #[command(flatten)]
    Ops(commands::Ops),
}

/// Settings of `pinq migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub services: ServiceArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Bad input from the user (a malformed flag value, a missing binary), as opposed to a
/// failure at run time. Mapped to exit code 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs a parsed command line and turns its result into what the process reports: on
/// failure, exactly one line `pinq: error: …` on stderr and a non-zero exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinq: error: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate(args) => {
            pinq_core::telemetry::init(&args.log);
            let report = migrate::run(&args.services.database_url).await?;
            println!("{report}");
            Ok(())
        }
        Command::Up(args) => {
            pinq_core::telemetry::init(&args.log);
            up::run(args).await
        }
        Command::Ops(ops) => commands::run(ops).await,
        Command::Tokens(args) => tokens::run(args).await,
    }
}

/// The error and its causes joined by ": ", on one line: some drivers put line breaks in
/// their messages, and a one-line error is what scripts and people grep for. A cause that
/// its parent already quotes at its end (sqlx and std I/O errors do) is left out.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if text.is_empty() || parts.last().is_some_and(|p| p.ends_with(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

/// 2 for bad input anywhere in the chain, the API client's own codes (see
/// [`client::ClientError::exit_code`]), 1 for everything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(code) = client::exit_code_of(e) {
        code
    } else if e.chain().any(|c| c.is::<UsageError>()) {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use clap::{CommandFactory, Parser};

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors_exit_2_even_with_context() {
        let e = Err::<(), _>(UsageError("bad --backend".into()))
            .context("invalid arguments")
            .expect_err("should fail");
        assert_eq!(exit_code(&e), 2);
        assert_eq!(one_line(&e), "invalid arguments: bad --backend");
        assert_eq!(exit_code(&anyhow::anyhow!("db down")), 1);
    }

    #[test]
    fn multi_line_messages_become_one_line() {
        let e = anyhow::anyhow!("first\nsecond\n").context("outer");
        assert_eq!(one_line(&e), "outer: first second");
    }

    #[test]
    fn causes_repeated_by_their_parent_are_left_out() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e =
            anyhow::Error::new(io).context("error communicating with database: connection refused");
        assert_eq!(
            one_line(&e),
            "error communicating with database: connection refused"
        );
    }

    #[test]
    fn up_parses_repeated_and_defaulted_flags() {
        let cli = Cli::try_parse_from([
            "pinq",
            "up",
            "--admin-token",
            "0123456789abcdef",
            "--backend",
            "a=http://a:5001",
            "--backend",
            "b=http://b:5001",
        ])
        .expect("valid command line");
        let Command::Up(args) = cli.command else {
            panic!("expected up");
        };
        assert_eq!(args.backends, ["a=http://a:5001", "b=http://b:5001"]);
        assert!(args.workers >= 1);
    }

    #[test]
    fn zero_workers_is_a_usage_error() {
        let err = Cli::try_parse_from([
            "pinq",
            "up",
            "--admin-token",
            "0123456789abcdef",
            "--workers",
            "0",
        ])
        .expect_err("should fail");
        assert_eq!(err.exit_code(), 2);
    }
}
