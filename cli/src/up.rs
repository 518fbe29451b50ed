//! `pinq up`: the whole system on one machine. Prepares the database, registers the
//! backends given on the command line, then runs `pinq-api`, the workers and
//! `pinq-scheduler` as child processes under a [`Supervisor`] until SIGINT or SIGTERM.

pub mod restart;
pub mod supervisor;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use pinq_core::config::{LogArgs, ServiceArgs};
use pinq_core::model::BackendName;

pub use restart::{Decision, RestartPolicy, RestartTracker};
pub use supervisor::{ChildSpec, Stage, Supervisor};

use crate::UsageError;

const UP_AFTER_HELP: &str = "\
Example:
  export PINQ_ADMIN_TOKEN=$(openssl rand -hex 16)
  pinq up --workers 2 --backend local=http://127.0.0.1:5001
  curl -s http://127.0.0.1:8080/healthz

pinq up creates and migrates the database, registers the given backends, then runs
pinq-api, the workers and pinq-scheduler from --bin-dir, prefixing their output with
[api], [worker-1], …, [scheduler]. Everything else in the environment (AMQP_URL,
PINQ_RETRY_*, PINQ_LEASE_SECS, …) is passed on to them.

A child that exits is restarted after a delay (1 s, doubling up to 30 s); one that exits
5 times within 60 s stops everything with exit code 1. Ctrl-C or SIGTERM stops the API,
then the workers (they finish or hand back their jobs), then the scheduler; a second
Ctrl-C skips the waiting.";

/// Settings of `pinq up`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = UP_AFTER_HELP)]
pub struct UpArgs {
    /// Worker processes to run.
    #[arg(
        long,
        env = "PINQ_WORKERS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=64)
    )]
    pub workers: u16,
    /// Jobs each worker runs at once [default: the worker's own, 32].
    #[arg(long, env = "PINQ_WORKER_CONCURRENCY", value_name = "C")]
    pub worker_concurrency: Option<usize>,
    /// Kubo backend to create or update before starting, as NAME=URL; repeat for more.
    #[arg(
        long = "backend",
        value_name = "NAME=URL",
        env = "PINQ_UP_BACKENDS",
        value_delimiter = ','
    )]
    pub backends: Vec<String>,
    /// Directory holding pinq-api, pinq-worker and pinq-scheduler [default: the directory
    /// of this executable].
    #[arg(long, env = "PINQ_BIN_DIR", value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Address the API listens on.
    #[arg(long, env = "PINQ_API_ADDR", default_value = "127.0.0.1:8080")]
    pub api_addr: SocketAddr,
    /// Admin token of the API (at least 16 characters); clients send it as
    /// `Authorization: Bearer <token>`.
    #[arg(long, env = "PINQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    /// How long a stopping worker may finish its jobs before handing them back; pinq up
    /// kills a worker that is still running 10 s after that.
    #[arg(
        long,
        env = "PINQ_SHUTDOWN_GRACE_SECS",
        default_value_t = 30,
        value_name = "SECS"
    )]
    pub shutdown_grace_secs: u64,
    #[command(flatten)]
    pub services: ServiceArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// A `--backend NAME=URL` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: BackendName,
    pub url: String,
}

impl BackendSpec {
    pub fn parse(s: &str) -> Result<Self, UsageError> {
        let s = s.trim();
        let Some((name, url)) = s.split_once('=') else {
            return Err(UsageError(format!(
                "invalid --backend '{s}': expected NAME=URL, e.g. local=http://127.0.0.1:5001"
            )));
        };
        let name = BackendName::parse(name.trim())
            .map_err(|e| UsageError(format!("invalid --backend '{s}': {e}")))?;
        let url = url.trim();
        let has_host = ["http://", "https://"].iter().any(|scheme| {
            url.strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty())
        });
        if !has_host {
            return Err(UsageError(format!(
                "invalid --backend '{s}': the URL must start with http:// or https:// (the Kubo RPC API, e.g. http://127.0.0.1:5001)"
            )));
        }
        Ok(BackendSpec {
            name,
            url: url.to_owned(),
        })
    }
}

/// Parses every `--backend` value; a name given twice is a mistake, not a silent override.
pub fn parse_backends(values: &[String]) -> Result<Vec<BackendSpec>, UsageError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(values.len());
    for v in values.iter().filter(|v| !v.trim().is_empty()) {
        let spec = BackendSpec::parse(v)?;
        if !seen.insert(spec.name.clone()) {
            return Err(UsageError(format!(
                "--backend {} is given twice",
                spec.name.as_str()
            )));
        }
        out.push(spec);
    }
    Ok(out)
}

/// The three programs `pinq up` runs.
#[derive(Debug, Clone)]
pub struct Programs {
    pub api: PathBuf,
    pub worker: PathBuf,
    pub scheduler: PathBuf,
}

impl Programs {
    /// Finds the programs in `dir`; names every one that is missing or not executable.
    pub fn locate(dir: &Path) -> Result<Programs, UsageError> {
        let [api, worker, scheduler] =
            ["pinq-api", "pinq-worker", "pinq-scheduler"].map(|name| dir.join(name));
        let missing: Vec<String> = [&api, &worker, &scheduler]
            .into_iter()
            .filter(|p| !is_executable(p))
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(UsageError(format!(
                "{} not found or not executable; build them with `cargo build --release` and point --bin-dir (PINQ_BIN_DIR) at target/release",
                missing.join(", ")
            )));
        }
        Ok(Programs {
            api,
            worker,
            scheduler,
        })
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The children of `pinq up`, in start order. Settings `pinq up` parsed itself are
/// passed on explicitly, so that a flag given to `pinq up` reaches its children too.
pub fn child_specs(args: &UpArgs, programs: &Programs) -> Vec<ChildSpec> {
    let common = vec![
        (
            "DATABASE_URL".to_owned(),
            args.services.database_url.clone(),
        ),
        (
            "PINQ_DB_MAX_CONNECTIONS".to_owned(),
            args.services.db_max_connections.to_string(),
        ),
        ("AMQP_URL".to_owned(), args.services.amqp_url.clone()),
        ("PINQ_QUEUE".to_owned(), args.services.queue.clone()),
        (
            "PINQ_URGENT_PRIORITY".to_owned(),
            args.services.urgent_priority.to_string(),
        ),
        (
            "PINQ_MESSAGE_JOBS".to_owned(),
            args.services.message_jobs.to_string(),
        ),
        ("RUST_LOG".to_owned(), args.log.log_filter.clone()),
        ("PINQ_LOG_FORMAT".to_owned(), args.log.log_format.clone()),
    ];
    let with = |extra: Vec<(&str, String)>| {
        let mut env = common.clone();
        env.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
        env
    };
    let mut worker_env = vec![(
        "PINQ_SHUTDOWN_GRACE_SECS",
        args.shutdown_grace_secs.to_string(),
    )];
    if let Some(c) = args.worker_concurrency {
        worker_env.push(("PINQ_WORKER_CONCURRENCY", c.to_string()));
    }

    let mut specs = vec![ChildSpec {
        label: "api".to_owned(),
        program: programs.api.clone(),
        args: vec![],
        env: with(vec![
            ("PINQ_API_ADDR", args.api_addr.to_string()),
            ("PINQ_ADMIN_TOKEN", args.admin_token.clone()),
        ]),
        stage: Stage::Api,
        stop_timeout: Duration::from_secs(15),
    }];
    for n in 1..=args.workers {
        specs.push(ChildSpec {
            label: format!("worker-{n}"),
            program: programs.worker.clone(),
            args: vec![],
            env: with(worker_env.clone()),
            stage: Stage::Workers,
            stop_timeout: Duration::from_secs(args.shutdown_grace_secs.saturating_add(10)),
        });
    }
    specs.push(ChildSpec {
        label: "scheduler".to_owned(),
        program: programs.scheduler.clone(),
        args: vec![],
        env: with(vec![]),
        stage: Stage::Scheduler,
        stop_timeout: Duration::from_secs(15),
    });
    specs
}

/// Runs `pinq up` until SIGINT or SIGTERM (Ok) or until a child keeps crashing (Err).
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // Everything the user can get wrong is checked before anything is touched.
    let backends = parse_backends(&args.backends)?;
    if args.admin_token.trim().len() < 16 {
        return Err(UsageError(
            "PINQ_ADMIN_TOKEN (--admin-token) must be a secret of at least 16 characters".into(),
        )
        .into());
    }
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("failed to find the directory of the pinq executable; pass --bin-dir")?
            .parent()
            .map(Path::to_path_buf)
            .context("the pinq executable has no parent directory; pass --bin-dir")?,
    };
    let programs = Programs::locate(&bin_dir)?;

    let pool = crate::migrate::prepare(&args.services.database_url).await?;
    let report = crate::migrate::migrate(&pool).await?;
    println!("pinq up: {report}");
    for b in &backends {
        pinq_core::db::upsert_backend(&pool, b.name.as_str(), "kubo", &b.url)
            .await
            .with_context(|| format!("failed to register backend {}", b.name.as_str()))?;
        println!("pinq up: backend {} -> {}", b.name.as_str(), b.url);
    }
    pool.close().await;

    // Signals are taken over only now: until here, Ctrl-C simply ends the process.
    let shutdown = pinq_core::shutdown::on_signals();
    stop_on_hangup(&shutdown);

    let mut supervisor = Supervisor::new(child_specs(&args, &programs), RestartPolicy::default());
    supervisor.start_all();
    if args.api_addr.port() == 0 {
        println!(
            "pinq up: API on {} with a port it picks (see the [api] lines)",
            args.api_addr.ip()
        );
    } else {
        println!(
            "pinq up: API on http://{addr}, API docs on http://{addr}/docs (OpenAPI: /openapi.json), health on /healthz",
            addr = args.api_addr
        );
    }
    println!(
        "pinq up: running api, {} worker(s), scheduler (pid {})",
        args.workers,
        std::process::id()
    );
    let result = supervisor.run(shutdown).await;
    println!("pinq up: stopped");
    result
}

/// A closed terminal stops everything gracefully too: the children run in their own
/// process groups and would otherwise outlive `pinq up`.
fn stop_on_hangup(shutdown: &tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            let token = shutdown.clone();
            tokio::spawn(async move {
                if hup.recv().await.is_some() {
                    tracing::info!("hangup received");
                    token.cancel();
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_spec_parses_name_and_url() {
        let b = BackendSpec::parse("local=http://127.0.0.1:5001").expect("valid");
        assert_eq!(b.name.as_str(), "local");
        assert_eq!(b.url, "http://127.0.0.1:5001");
        // Only the first '=' separates: URLs may contain more.
        let b = BackendSpec::parse(" eu-1.kubo = https://k.example/api?x=1 ").expect("valid");
        assert_eq!(b.name.as_str(), "eu-1.kubo");
        assert_eq!(b.url, "https://k.example/api?x=1");
    }

    #[test]
    fn backend_spec_rejects_bad_input() {
        for bad in [
            "local",
            "=http://x",
            "-x=http://x",
            "local=127.0.0.1:5001",
            "local=ftp://x",
            "local=http://",
            "local=",
        ] {
            let err = BackendSpec::parse(bad).expect_err(bad);
            assert!(
                err.to_string().starts_with("invalid --backend"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn backend_list_skips_empty_entries_and_rejects_duplicates() {
        let ok =
            parse_backends(&["a=http://a".into(), "".into(), "b=http://b".into()]).expect("valid");
        assert_eq!(ok.len(), 2);
        let err =
            parse_backends(&["a=http://a".into(), "a=http://b".into()]).expect_err("duplicate");
        assert!(err.to_string().contains("given twice"), "{err}");
    }

    #[test]
    fn missing_binaries_are_named() {
        let err = Programs::locate(Path::new("/nonexistent")).expect_err("nothing there");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/pinq-api"), "{msg}");
        assert!(msg.contains("/nonexistent/pinq-scheduler"), "{msg}");
        assert!(msg.contains("cargo build --release"), "{msg}");
    }

    #[test]
    fn children_are_labelled_staged_and_configured() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from([
            "pinq",
            "up",
            "--workers",
            "2",
            "--worker-concurrency",
            "4",
            "--admin-token",
            "0123456789abcdef",
            "--shutdown-grace-secs",
            "5",
        ])
        .expect("valid command line");
        let crate::Command::Up(args) = cli.command else {
            panic!("expected up");
        };
        let programs = Programs {
            api: "/b/pinq-api".into(),
            worker: "/b/pinq-worker".into(),
            scheduler: "/b/pinq-scheduler".into(),
        };
        let specs = child_specs(&args, &programs);
        let labels: Vec<_> = specs.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["api", "worker-1", "worker-2", "scheduler"]);
        let env = |label: &str, key: &str| {
            specs
                .iter()
                .find(|s| s.label == label)
                .and_then(|s| s.env.iter().find(|(k, _)| k == key))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            env("worker-2", "PINQ_WORKER_CONCURRENCY").as_deref(),
            Some("4")
        );
        assert_eq!(env("api", "PINQ_WORKER_CONCURRENCY"), None);
        assert_eq!(
            env("api", "PINQ_ADMIN_TOKEN").as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(specs[1].stop_timeout, Duration::from_secs(15));
        assert_eq!(specs[1].stage, Stage::Workers);
    }
}
