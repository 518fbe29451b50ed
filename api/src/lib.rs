//! pinq-api: the HTTP server. Batch submission and inspection, backends, health.
//!
//! Only this crate knows HTTP request and response shapes. It writes jobs to PostgreSQL
//! and then publishes their messages; it never talks to an IPFS backend.

mod auth;
mod backend_admin;
mod backends;
mod batch_body;
mod batches;
mod error;
mod fallback;
mod health;
mod input;
mod joblist;
mod jobs;
mod openapi;
mod pinindex;
mod pins;
mod schedules;
mod stats;
mod tokens;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use pinq_core::amqp::Publisher;
use pinq_core::config::{ApiArgs, LogArgs, RetryArgs, ServiceArgs};
use pinq_core::retry::RetryPolicy;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::{ApiError, Problem};

/// Command-line and environment settings of `pinq-api`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pinq-api", version, about = "pinq HTTP API server")]
pub struct Args {
    #[command(flatten)]
    pub services: ServiceArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub publisher: Arc<Publisher>,
    admin_token: Arc<str>,
    pub default_retry: RetryPolicy,
    pub max_batch_ops: usize,
    /// Background publishes still under way; drained on shutdown.
    pub dispatches: TaskTracker,
    /// Room for the Pinning Service API's best-effort connects to a pin's origins, apart
    /// from the publishes', so that slow origins never hold publishes up.
    pub origin_connects: Arc<tokio::sync::Semaphore>,
    /// Pinning Service API settings (placement, priority, swarm port).
    pub psa: Arc<pins::PsaConfig>,
    /// Backend peer ids for PSA `delegates`, cached.
    pub peers: Arc<pins::PeerCache>,
    /// HTTP client for the few backend calls the API makes (`id` for delegates, best-effort
    /// `swarm/connect` to PSA origins).
    pub http: reqwest::Client,
    /// `/openapi.json`, built once.
    pub openapi: Arc<serde_json::Value>,
}

/// A bound, not yet serving, API server.
pub struct Server {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl Server {
    /// Connects to PostgreSQL, checks the schema is migrated, and binds the listener.
    /// The broker is connected lazily: the API accepts batches while RabbitMQ is down.
    pub async fn build(args: Args) -> anyhow::Result<Server> {
        if args.api.admin_token.trim().len() < 16 {
            anyhow::bail!(
                "PINQ_ADMIN_TOKEN must be set to a secret of at least 16 characters (see .env.example)"
            );
        }
        let default_retry = args
            .retry
            .policy()
            .validate()
            .context("invalid default retry policy (PINQ_RETRY_*)")?;
        // A lazy pool: the server starts and answers 503 while PostgreSQL is down, and
        // connects as soon as it is back.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(args.services.db_max_connections)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(&args.services.database_url)
            .context("invalid DATABASE_URL")?;
        let publisher = Arc::new(Publisher::new(
            &args.services.amqp_url,
            &args.services.queue,
            args.services.urgent_priority,
            args.services.message_jobs,
        ));
        let state = AppState {
            pool,
            publisher,
            admin_token: Arc::from(args.api.admin_token.trim()),
            default_retry,
            max_batch_ops: args.api.max_batch_ops,
            dispatches: TaskTracker::new(),
            origin_connects: Arc::new(tokio::sync::Semaphore::new(pins::MAX_ORIGIN_CONNECTS)),
            psa: Arc::new(pins::PsaConfig {
                backends: args
                    .api
                    .psa
                    .psa_backends
                    .iter()
                    .map(|b| b.trim().to_owned())
                    .filter(|b| !b.is_empty())
                    .collect(),
                priority: pinq_core::model::Priority::new(i64::from(args.api.psa.psa_priority))
                    .context("invalid PINQ_PSA_PRIORITY")?,
                swarm_port: args.api.psa.psa_swarm_port,
                delegates: pinq_core::psa::configured_delegates(&args.api.psa.psa_delegates)
                    .map_err(|e| anyhow::anyhow!("invalid PINQ_PSA_DELEGATES: {e}"))?,
            }),
            peers: Arc::new(pins::PeerCache::default()),
            http: pinq_core::kubo::KuboClient::http_client(),
            openapi: Arc::new(openapi::document().context("failed to build the OpenAPI document")?),
        };
        let router = router(
            state.clone(),
            args.api.max_body_bytes,
            Duration::from_secs(args.api.request_timeout_secs),
        );
        let listener = TcpListener::bind(args.api.api_addr)
            .await
            .with_context(|| format!("failed to bind {}", args.api.api_addr))?;
        Ok(Server {
            listener,
            router,
            state,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains requests and outstanding
    /// publishes (each with a deadline).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        tracing::info!(%addr, "pinq-api listening");
        // A line on stdout that launchers and tests wait for.
        println!("pinq-api listening on http://{addr}");
        let drain = shutdown.clone();
        let serve = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { drain.cancelled().await });
        let serve = tokio::spawn(async move { serve.await });
        shutdown.cancelled().await;
        match tokio::time::timeout(Duration::from_secs(10), serve).await {
            Ok(r) => r.context("server task panicked")??,
            Err(_) => tracing::warn!("requests still running after 10 s; stopping anyway"),
        }
        self.state.dispatches.close();
        if tokio::time::timeout(Duration::from_secs(10), self.state.dispatches.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "publishes still running after 10 s; the relay will dispatch those jobs"
            );
        }
        self.state.publisher.close().await;
        self.state.pool.close().await;
        tracing::info!("pinq-api stopped");
        Ok(())
    }
}

fn router(state: AppState, max_body_bytes: usize, request_timeout: Duration) -> Router {
    let authed = Router::new()
        .route("/v1/backends", post(backends::create).get(backends::list))
        .route("/v1/batches", post(batches::submit).get(batches::list))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/jobs", get(batches::jobs))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/batches/{id}/retry-failed", post(batches::retry_failed))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/backends/{name}/health", get(backends::health_history))
        .route("/v1/schedules", get(schedules::list))
        .route(
            "/v1/schedules/{name}",
            axum::routing::patch(schedules::patch),
        )
        .route("/v1/schedules/{name}/run", post(schedules::run_now))
        .route("/v1/schedules/{name}/runs", get(schedules::runs))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/workers", get(workers::list))
        .route("/v1/stats", get(stats::get))
        .route("/v1/jobs", get(joblist::list))
        .route("/v1/pin-index", get(pinindex::list))
        .route(
            "/v1/backends/{name}",
            axum::routing::delete(backend_admin::delete),
        )
        .route("/v1/backends/{name}/check", post(backend_admin::check))
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    // The Pinning Service API: its own error shape, including for 401.
    let psa = Router::new()
        .route("/pins", get(pins::list).post(pins::add))
        .route(
            "/pins/{requestid}",
            get(pins::get).post(pins::replace).delete(pins::remove),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token_psa,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(openapi::docs))
        .merge(authed)
        .merge(psa)
        .fallback(fallback::not_found)
        // After every route is added: it applies to the routes already there.
        .method_not_allowed_fallback(fallback::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            request_timeout,
            fallback::timeout,
        ))
        .with_state(state)
}
